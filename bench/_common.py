"""Helpers shared by the benchmarks: environment record, timing, peak memory, tables, JSON.

Imported as ``_common`` by the scripts beside it (``python bench/<script>.py`` puts ``bench/`` on
``sys.path``).  See ``bench/README.md`` for the measurement method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata, util
from pathlib import Path
from typing import Any

import torch

MiB = 2**20
REPO = Path(__file__).resolve().parents[1]

CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc setting for memory-measuring child processes: every block of 64 KiB or more (every
activation of these networks) is its own mmap, unmapped when freed, so the resident set follows
the live tensors instead of keeping freed heap pages.  Setting it also switches off glibc's
dynamic threshold, which would otherwise move large blocks onto the heap after the first free."""


# ----------------------------------------------------------------------------- environment


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages of the machine (other jobs included)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on; stored with every result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": package_version("monai"),
        "imaml_seg": package_version("imaml-seg"),
        "git": git_revision(),
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def peer_status(module: str) -> str:
    """'ok' if ``module`` imports, else why not ('unavailable: ...'); never raises."""
    if util.find_spec(module) is None:
        return "unavailable: not installed"
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - any import failure makes the column unavailable
        return f"unavailable: import failed ({type(err).__name__}: {err})"
    return "ok"


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of one call of ``fn`` (device synchronised before and after) and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def summary(times: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": [round(t, 6) for t in times],
    }


def time_repeated(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, Any]:
    """``warmup`` untimed calls, then the median (and spread) of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    return summary([time_once(fn, device)[0] for _ in range(repeats)])


def thread_check(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """Median time of ``fn`` at the current torch thread count and at 1 thread.

    On a CPU shared with other jobs, OpenMP threads that wait for each other at every operator
    can make N threads many times slower than one (seen here: one gradient 2.6 s at 2 threads
    against 0.06 s at 1, load average 4.9 on 2 cores); such timings measure the machine's load."""
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"threads": threads}
    if device.type != "cpu" or threads == 1:
        return out
    out["median_s"] = time_repeated(fn, device, repeats, warmup=1)["median_s"]
    torch.set_num_threads(1)
    try:
        out["median_s_1_thread"] = time_repeated(fn, device, repeats, warmup=1)["median_s"]
    finally:
        torch.set_num_threads(threads)
    out["speedup_over_1_thread"] = out["median_s_1_thread"] / out["median_s"]
    return out


def machine_warnings(
    env: dict[str, Any], check: dict[str, Any], loads: Sequence[Sequence[float]]
) -> list[str]:
    """Plain-language warnings when the machine's state makes the timings unreliable."""
    warnings = []
    cpus = env.get("cpus_usable") or env.get("cpu_count") or 1
    worst = max([env["load_average_start"][0], *(load[0] for load in loads)])
    if env["device"] == "cpu" and worst > cpus + 0.5:
        warnings.append(
            f"1-minute load average reached {worst} on {cpus} usable CPUs (this run's own threads "
            "included): other jobs competed for the cores, timings are slower and noisier than "
            "on an idle machine"
        )
    if check.get("speedup_over_1_thread") is not None and check["speedup_over_1_thread"] < 1.0:
        warnings.append(
            f"{check['threads']} threads ran one gradient {1 / check['speedup_over_1_thread']:.1f}x"
            " slower than 1 thread (oversubscribed cores): rerun on a quieter machine or with "
            "--threads 1"
        )
    return warnings


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of ``fn`` above what was held just before it, in bytes.

    CUDA: ``max_memory_allocated - memory_allocated`` (peak statistics reset first): tensor bytes
    through PyTorch's allocator.  CPU: the kernel's peak resident set (VmHWM, reset just before the
    call through /proc/self/clear_refs) minus the resident set before the call; meant to run in a
    child started with ``CHILD_MALLOC_ENV`` so that freed tensors leave the resident set.  Where
    VmHWM cannot be reset, ``ru_maxrss`` (peak since process start) is used and the result says so.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - before, "counter": "cuda.max_memory_allocated"}
    import gc
    import resource

    gc.collect()
    reset = _reset_hwm()
    before = _proc_status_kib("VmRSS") * 1024
    fn()
    if reset:
        peak = _proc_status_kib("VmHWM") * 1024
        counter = "VmHWM (reset) - VmRSS before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        counter = "ru_maxrss (no reset possible) - VmRSS before"
    return {"peak_bytes": peak - before, "counter": counter}


def run_child(script: Path, args: Sequence[str], timeout: float) -> Any:
    """Run ``script`` with ``args`` in a fresh interpreter (malloc set for memory measurement)
    and return the JSON value printed on its last stdout line."""
    env = dict(os.environ, **CHILD_MALLOC_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(("{", "["))]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory child failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain fixed-width text table."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "MISSED")


def log(message: str) -> None:
    """Progress to stderr (stdout carries the table)."""
    print(message, file=sys.stderr, flush=True)


def base_parser(
    doc: str, default_out: Path, *, resolution: str, quick: str, cpu_only: bool = False
) -> argparse.ArgumentParser:
    """The flags every benchmark shares: --resolution, --out, --quick, --device, --threads,
    --repeats; ``resolution`` and ``quick`` are their help texts."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=None, help=resolution)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--quick", action="store_true", help=quick)
    if cpu_only:
        parser.add_argument("--device", default="cpu", choices=["cpu"],
                            help="cpu only: these are CPU options")
    else:
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None)
    return parser
