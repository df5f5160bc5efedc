"""One split at a glance: mean Dice by training budget (columns) and method and test-time policy
(rows), read from the finished units of the split's studies.

For a base study ``B`` (e.g. ``unseen_polyp``) the budgets are ``B`` (1x), ``B_long`` (2x) and
``B_4x`` ... ``B_32x``, and each budget's policies are its companion studies: the preset's test-time
loop (the study itself), settings chosen on the sources (``_tuned``), no fine-tuning
(``_zeroshot``), steps chosen by support cross-validation (``_supportcv``) and by its one-standard-
error rule (``_onese``).  A cell is the mean Dice over the draws at ``--shots`` (``-`` where that
unit has not run); the best cell of each budget is in bold.  Every study of a split scores the
same draws (checked).  Companions of some budgets score retrained weights (their study files say
so), so a budget's rows can differ by a training run's rounding as well as by the policy::

    python scripts/budget_table.py unseen_polyp --shots 5
    python scripts/budget_table.py unseen_polyp --shots 5 --readme README.md
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

BUDGETS = (("1x", ""), ("2x", "_long"), ("4x", "_4x"), ("8x", "_8x"), ("16x", "_16x"),
           ("32x", "_32x"))
POLICIES = (("preset loop", ""), ("tuned on the sources", "_tuned"),
            ("no fine-tuning", "_zeroshot"), ("support CV", "_supportcv"),
            ("support CV, one-SE", "_onese"))
METHOD_ORDER = ("scratch", "transfer", "fomaml", "maml", "reptile", "imaml", "imaml_warm",
                "prototype", "incontext")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the split's 1x study (experiments/<base>.toml)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--readme", type=Path, help="write the table into this README's block")
    return p


def cells(root: Path, base: str, shots: int) -> tuple[list[str], dict[tuple[str, str, str], float]]:
    """The budgets found and ``{(method, policy, budget): mean Dice at shots}``."""
    experiments = root / "experiments"
    if not (experiments / f"{base}.toml").is_file():
        raise ConfigError(f"{experiments / base}.toml: no such study")
    reference = Study.from_file(experiments / f"{base}.toml")
    budgets, found = [], {}
    for budget, suffix in BUDGETS:
        if not (experiments / f"{base}{suffix}.toml").is_file():
            continue
        budgets.append(budget)
        for policy, companion in POLICIES:
            name = f"{base}{suffix}{companion}"
            if not (experiments / f"{name}.toml").is_file():
                continue
            study = Study.from_file(experiments / f"{name}.toml")
            study.check_same_draws(reference)
            for method in study.methods:
                unit = root / "results" / name / f"{method}.json"
                if not unit.is_file():
                    continue
                records = json.loads(unit.read_text())["records"]
                dice = [r["dice"] for r in records if r["shots"] == shots]
                if dice:
                    found[(method, policy, budget)] = float(np.mean(dice))
    return budgets, found


def table(args: argparse.Namespace) -> str:
    """The markdown table for parsed arguments (raises ConfigError on bad input)."""
    budgets, found = cells(args.root, args.base, args.shots)
    if not found:
        raise ConfigError(f"{args.base}: no finished unit at {args.shots} shots")
    methods = sorted({m for m, _, _ in found}, key=lambda m: (
        METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    best = {b: max(v for (_, _, bb), v in found.items() if bb == b)
            for b in budgets if any(bb == b for _, _, bb in found)}
    lines = ["| method | test-time policy | " + " | ".join(budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for method in methods:
        for policy, _ in POLICIES:
            row = [found.get((method, policy, b)) for b in budgets]
            if all(v is None for v in row):
                continue
            text = ["-" if v is None else (f"**{v:.3f}**" if v == best[b] else f"{v:.3f}")
                    for v, b in zip(row, budgets, strict=True)]
            lines.append(f"| {method} | {policy} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """Each ``<!-- BUDGETS: ARGS -->`` block of a README: its arguments and its table."""
    return readme_block.blocks(text, "BUDGETS")


def main(argv: list[str] | None = None) -> int:
    return readme_block.run(argv, parser(), table, "BUDGETS")


if __name__ == "__main__":
    sys.exit(main())
