"""Dice against training compute: does meta-training buy more than the same CPU time spent on
pretraining?

Each ``--series LABEL UNIT [UNIT ...]`` is one recipe at growing budgets; a UNIT is
``study:method`` with ``{seed}`` where the training seed goes (or ``{_seed}``: nothing for seed 0,
whose study names carry no seed, ``_seed<k>`` for the others), e.g.::

    python scripts/compute_curve.py --seeds 1 2 3 --shots 5 \\
        --series transfer unseen_skin_seed{seed}_start03_warm:transfer \\
            unseen_skin_seed{seed}_start03_warm_transfer_9000:transfer \\
        --series "warm iMAML" unseen_skin_seed{seed}_start03_warm:imaml_warm \\
        --png results/compute_skin.png

A unit's training compute is the CPU time its training log records (the sum of every step's
seconds), plus, for warm-started iMAML, the log of the transfer run it started from (found in its
study or up the study's ``extend_from`` chain, the run with the configured number of
pretraining steps); a ``train_from`` companion (other test-time settings) carries its trained
unit's log.  Per unit: the mean training minutes and the mean and sample standard deviation over
the seeds of the mean Dice over the draws.  The seconds are as measured, so they carry the
machine's load (this project's units: one torch thread, two units at a time).

``--readme README.md`` writes the table between ``<!-- COMPUTE: ARGS -->`` and
``<!-- /COMPUTE -->`` (tests/test_readme.py checks that it stays true); ``--png`` draws the
curves (the README block's arguments leave it out: the figure is drawn once, when asked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block  # noqa: E402

from imaml_seg.config import ConfigError  # noqa: E402
from imaml_seg.experiment import Study  # noqa: E402
from imaml_seg.plots import save_png  # noqa: E402

TAG = "COMPUTE"


def _study(root: Path, name: str) -> Study:
    spec = root / "experiments" / f"{name}.toml"
    if not spec.is_file():
        raise ConfigError(f"{spec}: no such study")
    return Study.from_file(spec)


def _result(root: Path, study: str, method: str) -> dict:
    path = root / "results" / study / f"{method}.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not run yet")
    return json.loads(path.read_text())


def _seconds(log: list[dict]) -> float:
    return float(sum(step.get("seconds", 0.0) for step in log))


def warm_start_seconds(root: Path, study: Study) -> float:
    """Training seconds of the transfer run a warm-started iMAML unit of ``study`` began from."""
    steps = study.config.meta.pretrain_steps
    name: str | None = study.train_from or study.name
    while name is not None:
        path = root / "results" / name / "transfer.json"
        if path.is_file():
            log = json.loads(path.read_text())["train_log"]
            if log and log[-1].get("step") == steps:
                return _seconds(log)
        name = _study(root, name).extend_from
    raise ConfigError(f"study {study.name}: no transfer run of {steps} steps up its extend_from "
                      "chain (its warm start)")


def unit_point(root: Path, unit: str, shots: int) -> tuple[float, float]:
    """``study:method``'s training seconds and mean Dice over its draws at ``shots``."""
    name, _, method = unit.partition(":")
    if not name or not method:
        raise ConfigError(f"{unit}: expected study:method")
    study = _study(root, name)
    result = _result(root, name, method)
    dice = [r["dice"] for r in result["records"] if r["shots"] == shots]
    if not dice:
        raise ConfigError(f"results/{name}/{method}.json: no draws at {shots} shots")
    seconds = _seconds(result["train_log"])
    if method == "imaml_warm":
        seconds += warm_start_seconds(root, study)
    return seconds, float(np.mean(dice))


def unit_name(template: str, seed: int) -> str:
    """``template`` for training seed ``seed``: ``{seed}`` its number, ``{_seed}`` the study-name
    suffix (``""`` for seed 0, else ``_seed<k>``)."""
    return template.format(seed=seed, _seed=f"_seed{seed}" if seed else "")


def series_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """One row per series and unit: label, unit template, mean minutes, Dice mean and sd."""
    rows = []
    for label, *units in args.series:
        if not units:
            raise ConfigError(f"--series {label}: no units")
        for template in units:
            if "{seed}" not in template and "{_seed}" not in template:
                raise ConfigError(f"{template}: put {{seed}} or {{_seed}} where the training "
                                  "seed goes")
            points = [unit_point(args.root, unit_name(template, s), args.shots)
                      for s in args.seeds]
            minutes = [p[0] / 60 for p in points]
            dice = [p[1] for p in points]
            rows.append({
                "series": label,
                "unit": template,
                "minutes": float(np.mean(minutes)),
                "dice": float(np.mean(dice)),
                "sd": float(np.std(dice, ddof=1)) if len(dice) > 1 else None,
            })
    return rows


def markdown(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [f"| recipe | unit (training seed {{seed}}: {seeds}) | training CPU minutes | "
             f"Dice {args.shots}-shot, mean +- sd over seeds |", "|---|---|---:|---|"]
    for r in rows:
        sd = "-" if r["sd"] is None else f"{r['sd']:.3f}"
        lines.append(f"| {r['series']} | `{r['unit']}` | {r['minutes']:.1f} | "
                     f"{r['dice']:.3f} +- {sd} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], args: argparse.Namespace, png: Path) -> None:
    """The curves: one line per series, training CPU minutes against Dice, sd as error bars."""
    import matplotlib.pyplot as plt  # the Agg backend: imaml_seg.plots sets it on import

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["series"] for r in rows):
        mine = sorted((r for r in rows if r["series"] == label), key=lambda r: r["minutes"])
        ax.errorbar([r["minutes"] for r in mine], [r["dice"] for r in mine],
                    yerr=[r["sd"] or 0.0 for r in mine], marker="o", capsize=3, label=label)
    ax.set_xlabel("training CPU minutes (one torch thread)")
    ax.set_ylabel(f"Dice, {args.shots} shots")
    ax.set_title(args.title or "Dice against training compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, png)


def make(args: argparse.Namespace) -> str:
    """The table (and the figure when ``--png``); raises ConfigError on bad input."""
    rows = series_rows(args)
    if args.png is not None:
        plot(rows, args, args.png)
    return markdown(rows, args)


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """Each ``<!-- COMPUTE: ARGS -->`` block of a README: its arguments and its table."""
    return readme_block.blocks(text, TAG)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", nargs="+", action="append", required=True,
                   metavar="LABEL UNIT", help="a label, then study:method units with {seed}")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--title")
    p.add_argument("--png", type=Path, help="draw the curves into this PNG")
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--readme", type=Path, help="write the table into this README's block")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.readme is not None and args.png is not None:
        # The block is named by its arguments; a figure path among them would be checked too.
        print("error: --readme and --png: run once with each", file=sys.stderr)
        return 2
    return readme_block.run(argv, parser(), make, TAG)


if __name__ == "__main__":
    sys.exit(main())
