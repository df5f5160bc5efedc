"""Where iMAML with learned proximal strengths lets the network move: one row per U-Net stage.

With ``meta.lam_lr > 0`` a run meta-learns one strength ``lam`` per weight tensor (the proximal
term ``lam/2 ||phi - theta||^2`` of adaptation): a large one holds that tensor near the learned
start, a small one lets it fit the support set.  For each unit named (``STUDY:METHOD``) this
prints, per stage of the U-Net (encoder ``conv_0``, ``down_1``-``down_4``, decoder ``upcat_4``-
``upcat_1``, ``final_conv``), the geometric mean of its tensors' strengths; the convolution biases
that an instance norm follows are left out (the norm removes them, so their derivative is zero
and they keep ``inner.lam``).  The last row counts the tensors at the upper bound
``meta.lam_max``::

    python scripts/learned_strengths.py \\
        unseen_skin_seed1_start03_warm_transfer_swa8000_warm300_lam:imaml_warm

Strengths are read from ``runs/<study>/<method>`` below ``--root`` and saved beside the unit's
result (``results/<study>/<method>.lam.json``) the first time, so the table can be printed again
without the weights.  ``--readme README.md`` writes it between ``<!-- STRENGTHS: ARGS -->`` and
``<!-- /STRENGTHS -->`` (tests/test_readme.py checks that it stays true).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block  # noqa: E402

from imaml_seg.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from imaml_seg.config import ConfigError  # noqa: E402

TAG = "STRENGTHS"
SAVED = ".lam.json"
"""Suffix of a unit's saved strengths (``results/<study>/<method>.lam.json``)."""
STAGES = {
    "conv_0": "encoder, 1/1",
    "down_1": "encoder, 1/2",
    "down_2": "encoder, 1/4",
    "down_3": "encoder, 1/8",
    "down_4": "bottleneck, 1/16",
    "upcat_4": "decoder, 1/8",
    "upcat_3": "decoder, 1/4",
    "upcat_2": "decoder, 1/2",
    "upcat_1": "decoder, 1/1",
    "final_conv": "output 1x1 conv",
}
"""U-Net stage (first part of a weight's name) and its label: where it sits, at which fraction
of the input's resolution."""


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """The README's learned-strength tables: each one's arguments and body."""
    return readme_block.blocks(text, TAG)


def unit_strengths(root: Path, unit: str, *, compute: bool = True) -> dict:
    """``{"train_seed", "inner_lam", "lam_max", "lam": {name: strength}}`` of ``STUDY:METHOD``:
    saved, or read from its finished run's checkpoint and saved (``compute``)."""
    study, sep, method = unit.partition(":")
    if not sep or not study or not method:
        raise ConfigError(f"{unit!r}: expected STUDY:METHOD")
    saved = root / "results" / study / f"{method}{SAVED}"
    if saved.is_file():
        return json.loads(saved.read_text())
    if not compute:
        raise ConfigError(f"{saved}: nothing saved for {unit}")
    run = root / "runs" / study / method
    try:
        ckpt = load_checkpoint(run)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    if not ckpt.lam:
        raise ConfigError(f"{run}: the run learned no proximal strengths (meta.lam_lr is 0)")
    if not ckpt.state.get("done"):
        raise ConfigError(f"{run}: the run has not finished (step {ckpt.step})")
    record = {
        "train_seed": ckpt.config.training_seed,
        "inner_lam": ckpt.config.inner.lam,
        "lam_max": ckpt.config.meta.lam_max,
        "lam": {k: round(float(v), 6) for k, v in ckpt.lam.items()},
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(record, indent=1) + "\n")
    return record


def stage_means(lam: dict[str, float]) -> dict[str, float]:
    """Geometric mean strength of each stage's tensors, convolution biases before a norm left
    out."""
    groups: dict[str, list[float]] = {}
    for name, value in lam.items():
        if name.endswith(".conv.bias"):
            continue
        groups.setdefault(name.split(".", 1)[0], []).append(value)
    return {s: math.exp(sum(map(math.log, v)) / len(v)) for s, v in groups.items()}


def table(units: list[str], records: list[dict]) -> str:
    """Markdown: one row per stage, one column per unit (named by its training seed) and their
    mean."""
    means = [stage_means(r["lam"]) for r in records]
    stages = [s for s in STAGES if any(s in m for m in means)]
    stages += sorted({s for m in means for s in m} - set(stages))
    lines = [
        "| stage | " + " | ".join(f"seed {r['train_seed']}" for r in records) + " | mean |",
        "|---" * (len(units) + 2) + "|",
    ]
    for s in stages:
        values = [m.get(s, math.nan) for m in means]
        lines.append(
            f"| {STAGES.get(s, s)} | " + " | ".join(f"{v:.2f}" for v in values)
            + f" | {sum(values) / len(values):.2f} |"
        )
    capped = [
        f"{sum(v >= r['lam_max'] * (1 - 1e-6) for v in r['lam'].values())} of {len(r['lam'])}"
        for r in records
    ]
    lines.append(f"| tensors at the bound ({records[0]['lam_max']:g}) | " + " | ".join(capped)
                 + " | |")
    starts = sorted({r["inner_lam"] for r in records})
    return "\n".join(lines) + f"\n\nStrengths start at inner.lam = {', '.join(map(str, starts))}."


def make(args: argparse.Namespace, *, compute: bool = True) -> str:
    """The table for ``args``; with ``compute=False`` only from saved strengths."""
    return table(args.units, [unit_strengths(args.root, u, compute=compute) for u in args.units])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("units", nargs="+", help="STUDY:METHOD of runs with learned strengths")
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--readme", type=Path, help="write the table into this README's block")
    return p


def main(argv: list[str] | None = None) -> int:
    return readme_block.run(argv, parser(), make, TAG)


if __name__ == "__main__":
    raise SystemExit(main())
