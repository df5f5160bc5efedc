"""CPU execution options against the default, on the inner-loop gradient, in one run.

    .venv/bin/python bench/options.py [--resolution 64] [--threads 2] [--quick]
                                      [--out bench/results/options.json]

Issue 7 asks that vmap over a meta-batch's tasks, channels_last, torch.compile and thread
settings be kept only where they measurably win.  Every row times the same work both ways, with
the study's ``cpu`` preset network (``imaml_seg.config.load('cpu')``: U-Net features 8..128,
64 px) on a meta-batch of ``meta_batch_size`` synthetic tasks of 5 support images:

1. ``vmap_tasks``: one support gradient per task (what every inner step of a meta-batch does),
   a Python loop of ``grad_and_value`` (default) against ``torch.func.vmap`` over the stacked
   task weights and images;
2. ``channels_last``: one support gradient with images and 4-D weights in ``channels_last``
   against contiguous (default);
3. ``torch_compile``: the network's forward under ``torch.compile`` (inductor), differentiated
   with ``torch.autograd.grad`` (AOTAutograd compiles the backward), against eager
   ``grad_and_value`` (default); Dynamo falls back to eager inside ``torch.func.grad``, so that is
   not the form to measure.  The first call's compile time is reported, not counted;
4. ``threads``: one gradient at ``--threads`` against 1 thread.

Every option's result is compared with the default's (max relative difference).  ``wins`` is
speedup >= 1.05; ``used`` says whether imaml-seg uses the option (a fact of the code), and the
goal per row is that it is used exactly when it wins.  Timings are medians of
``--repeats`` calls, default and option interleaved so that a change of machine load hits both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch.func import grad_and_value, vmap

from imaml_seg.config import load, merge
from imaml_seg.data.synthetic import synthetic_arrays
from imaml_seg.data.tasks import TaskSampler
from imaml_seg.losses import dice_bce_loss
from imaml_seg.model import build_model, forward, get_params, num_params

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "options.json"
WIN = 1.05

FULL = {"resolution": 64, "features": None, "repeats": 9, "threads": 2, "compile": True}
QUICK = {"resolution": 32, "features": (4, 4, 8, 8, 16, 4), "repeats": 2, "threads": 1,
         "compile": False}

USED = {
    "vmap_tasks": (False, "no: tasks of a meta-batch run one after another (meta/trainer.py)"),
    "channels_last": (False, "no: contiguous NCHW tensors"),
    "torch_compile": (False, "no: eager torch.func"),
    "threads": (True, "yes: torch's default, all cores (OMP_NUM_THREADS=1 on a shared machine)"),
}
"""Whether imaml-seg uses each option, and how; the goal is that this matches ``wins``."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser(
        __doc__, DEFAULT_OUT, resolution="px (default 64; quick 32)",
        quick="tiny smoke configuration (32 px, features 4..16, no compile)", cpu_only=True,
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    return parser.parse_args(argv)


def _flat(out: Any) -> torch.Tensor:
    """Gradients (dict, possibly stacked) and loss of a ``grad_and_value`` call, as one vector."""
    grads, value = out
    return torch.cat([t.detach().reshape(-1).float() for t in grads.values()]
                     + [value.detach().reshape(-1).float()])


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(default: Any, option: Any, repeats: int) -> dict[str, Any]:
    """Median times of ``default`` and ``option`` (interleaved, after a warm-up) and speedup."""
    default()
    option()
    t_default, t_option = [], []
    for _ in range(repeats):
        t_default.append(common.time_once(default, torch.device("cpu"))[0])
        t_option.append(common.time_once(option, torch.device("cpu"))[0])
    d, o = common.summary(t_default), common.summary(t_option)
    speedup = d["median_s"] / o["median_s"]
    return {"default": d, "option": o, "speedup": speedup, "wins": speedup >= WIN}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    for key in ("resolution", "threads", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.no_compile:
        preset["compile"] = False
    torch.set_num_threads(preset["threads"])
    started = time.time()
    device = torch.device("cpu")
    env = common.environment(device)

    overrides: dict[str, Any] = {"data": {"resolution": preset["resolution"]}}
    if preset["features"] is not None:
        overrides["model"] = {"features": list(preset["features"])}
    config = merge(load("cpu"), overrides)
    r, n_tasks = config.data.resolution, config.meta.meta_batch_size
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    theta = {k: v.detach() for k, v in get_params(model).items()}
    sources = [synthetic_arrays(d, 32, r, config.seed) for d in range(n_tasks)]
    sampler = TaskSampler(sources, shots=config.data.shots, query_size=config.data.query_size,
                          seed=config.seed, test_fraction=0.5, split_seed=0, augment=False)
    tasks = [sampler.sample(0, i) for i in range(n_tasks)]
    settings = {"preset": "cpu", "resolution": r, "features": list(config.model.features),
                "num_params": num_params(theta), "meta_batch_size": n_tasks,
                "shots": config.data.shots, "repeats": preset["repeats"],
                "threads": preset["threads"], "win_threshold": WIN}
    common.log(f"options bench: {settings}, load {common.load_average()}")
    loads = {"start": common.load_average()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(forward(model, p, x), y)

    # Different weights per task, as in an inner step after the first.
    gen = torch.Generator().manual_seed(1)
    phis = [{k: t + 0.01 * torch.randn(t.shape, generator=gen) for k, t in theta.items()}
            for _ in tasks]
    rows: dict[str, dict[str, Any]] = {}

    # 1. vmap over the tasks of a meta-batch
    stacked = {k: torch.stack([p[k] for p in phis]) for k in theta}
    xs = torch.stack([t.support_x for t in tasks])
    ys = torch.stack([t.support_y for t in tasks])
    loop_fn = grad_and_value(loss)
    vmap_fn = vmap(grad_and_value(loss))

    def loop() -> Any:
        outs = [loop_fn(p, t.support_x, t.support_y) for p, t in zip(phis, tasks, strict=True)]
        return ({k: torch.stack([o[0][k] for o in outs]) for k in theta},
                torch.stack([o[1] for o in outs]))

    def vmapped() -> Any:
        return vmap_fn(stacked, xs, ys)

    try:
        rows["vmap_tasks"] = compare(loop, vmapped, preset["repeats"])
        rows["vmap_tasks"]["max_rel_diff"] = _rel_diff(_flat(vmapped()), _flat(loop()))
    except Exception as err:  # noqa: BLE001 - an option that fails to run is reported
        rows["vmap_tasks"] = {"status": f"failed: {type(err).__name__}: {err}"[:160]}
    row = rows["vmap_tasks"]
    common.log(f"  vmap_tasks: {row.get('speedup', row.get('status'))}")

    # 2. channels_last
    task = tasks[0]
    phi = phis[0]
    cl_phi = {k: (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
              for k, t in phi.items()}
    cl_x = task.support_x.contiguous(memory_format=torch.channels_last)

    def eager() -> Any:
        return loop_fn(phi, task.support_x, task.support_y)

    def channels_last() -> Any:
        return loop_fn(cl_phi, cl_x, task.support_y)

    rows["channels_last"] = compare(eager, channels_last, preset["repeats"])
    rows["channels_last"]["max_rel_diff"] = _rel_diff(_flat(channels_last()), _flat(eager()))
    common.log(f"  channels_last: {rows['channels_last']['speedup']:.3f}")

    # 3. torch.compile
    if preset["compile"]:
        try:
            # Dynamo does not trace through torch.func.grad (it falls back to eager), so the
            # network's forward is compiled and differentiated with autograd (AOTAutograd
            # compiles its backward too): the form in which compile can pay.
            compiled_forward = torch.compile(lambda p, x: forward(model, p, x))

            def compiled() -> Any:
                leaves = {k: t.detach().requires_grad_() for k, t in phi.items()}
                value = dice_bce_loss(compiled_forward(leaves, task.support_x), task.support_y)
                grads = torch.autograd.grad(value, list(leaves.values()))
                return dict(zip(leaves, grads, strict=True)), value.detach()

            start = time.perf_counter()
            compiled()
            compile_s = time.perf_counter() - start

            rows["torch_compile"] = compare(eager, compiled, preset["repeats"])
            rows["torch_compile"]["first_call_s"] = compile_s
            rows["torch_compile"]["max_rel_diff"] = _rel_diff(_flat(compiled()), _flat(eager()))
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            rows["torch_compile"] = {"status": f"failed: {type(err).__name__}: {first}"[:160],
                                     "error": str(err)[:2000]}
    else:
        rows["torch_compile"] = {"status": "skipped (--quick or --no-compile)"}
    row = rows["torch_compile"]
    common.log(f"  torch_compile: {row.get('speedup', row.get('status'))}")

    # 4. threads
    check = common.thread_check(eager, device, repeats=preset["repeats"])
    if "median_s" in check:
        rows["threads"] = {
            "default": {"median_s": check["median_s_1_thread"], "threads": 1},
            "option": {"median_s": check["median_s"], "threads": check["threads"]},
            "speedup": check["speedup_over_1_thread"],
            "wins": check["speedup_over_1_thread"] >= WIN,
        }
    else:
        rows["threads"] = {"status": "skipped (1 thread requested)"}
    loads["end"] = common.load_average()

    for name, row in rows.items():
        row["used"], row["how"] = USED[name]
    goals = [
        {"name": f"{name}: used by imaml-seg exactly when it wins (speedup >= {WIN})",
         "value": row.get("speedup"),
         "met": (row["used"] == row["wins"]) if "wins" in row else None}
        for name, row in rows.items()
    ]
    payload = {
        "benchmark": "options",
        "command": " ".join(sys.argv),
        "settings": settings,
        "environment": env,
        "options": rows,
        "goals": goals,
        "load_average": loads,
        "wall_s": time.time() - started,
    }
    common.write_json(args.out, payload)
    table_rows = [
        [name, common.fmt(row.get("default", {}).get("median_s")),
         common.fmt(row.get("option", {}).get("median_s")), common.fmt(row.get("speedup")),
         common.fmt(row.get("max_rel_diff")),
         ("wins" if row["wins"] else "does not win") if "wins" in row else row["status"],
         row["how"]]
        for name, row in rows.items()
    ]
    print(common.table(["option", "default s", "option s", "speedup", "max rel diff", "verdict",
                        "imaml-seg"], table_rows,
                       title=f"CPU options, {r} px, {preset['threads']} threads"))
    print("\nGoals")
    for goal in goals:
        print(f"  {common.verdict(goal['met'])}  {goal['name']}: {common.fmt(goal['value'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
