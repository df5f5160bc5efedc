"""Test-time step policies side by side, on the same trained weights.

For each base study ``B`` this reads the finished units of its companion studies (same weights,
other ``[eval]``): the preset's fixed steps (``B_retrained`` where that study exists, since its
units were retrained for the companions, else ``B``), no fine-tuning (``B_zeroshot``), steps
chosen by support cross-validation's best mean (``B_supportcv``), by its one-standard-error
rule (``B_onese``) and by its paired one-standard-error rule (``B_pairedse``), and prints one
markdown row per method and shot count: each policy's mean Dice over the draws (``-`` where the
companion or its unit is missing) and each standard-error rule against the best-mean rule
(points, paired Wilcoxon p over draws / over test images).  With ``--no-fine-tuning`` it prints
instead the fixed steps against no fine-tuning (the question a single shot leaves, since it
cannot be split for support CV)::

    python scripts/step_policies.py unseen_polyp unique_polyp_4x --shots 5 10
    python scripts/step_policies.py unseen_polyp unseen_skin --shots 1 --no-fine-tuning
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_units import compare  # noqa: E402

from imaml_seg.config import ConfigError  # noqa: E402
from imaml_seg.evaluation import format_p_pair  # noqa: E402
from imaml_seg.experiment import Study  # noqa: E402

POLICIES = (("fixed", ""), ("0 steps", "_zeroshot"), ("support CV", "_supportcv"),
            ("one-SE", "_onese"), ("paired-SE", "_pairedse"))
RULES = ("one-SE", "paired-SE")
"""The policies compared with the best-mean rule (``support CV``) draw by draw."""


def fixed_study(root: Path, base: str) -> str:
    """The study whose units score the companions' weights with the preset's steps."""
    retrained = f"{base}_retrained"
    return retrained if (root / "experiments" / f"{retrained}.toml").is_file() else base


def policy_rows(root: Path, base: str, shots: list[int]) -> list[dict[str, object]]:
    """One row per method and shot count: ``{"study", "method", "shots", <policy>: mean Dice
    or None, per rule in :data:`RULES` "<rule> points", "<rule> p" (over draws) and "<rule> p
    images" (over test images) against support CV, and "0 steps points", "0 steps p", "0 steps p
    images", "0 steps wins" (draws where it scores higher) against the fixed steps (None where
    either is missing)}``."""
    studies = {
        name: fixed_study(root, base) if suffix == "" else f"{base}{suffix}"
        for name, suffix in POLICIES
    }
    found = {p: s for p, s in studies.items() if (root / "experiments" / f"{s}.toml").is_file()}
    if set(found) <= {"fixed"}:
        raise ConfigError(
            f"{base}: no companion study (_zeroshot, _supportcv, _onese, _pairedse) found"
        )
    reference = Study.from_file(root / "experiments" / f"{found['fixed']}.toml")
    methods: list[str] = []
    for s in found.values():
        study = Study.from_file(root / "experiments" / f"{s}.toml")
        study.check_same_draws(reference)
        methods += [m for m in study.methods if m not in methods and s != found["fixed"]]
    rows = []
    for method in methods:
        records = {}
        for policy, s in found.items():
            path = root / "results" / s / f"{method}.json"
            if path.is_file():
                records[policy] = json.loads(path.read_text())["records"]
        for k in shots:
            row: dict[str, object] = {"study": base, "method": method, "shots": k}
            for policy, _ in POLICIES:
                dice = [r["dice"] for r in records.get(policy, []) if r["shots"] == k]
                row[policy] = float(np.mean(dice)) if dice else None
            for rule in RULES:
                for key in ("points", "p", "p images"):
                    row[f"{rule} {key}"] = None
                if rule in records and "support CV" in records:
                    (c,) = compare(root, f"{found[rule]}:{method}",
                                   f"{found['support CV']}:{method}", [k])
                    row[f"{rule} points"], row[f"{rule} p"] = c["points"], c["p"]
                    row[f"{rule} p images"] = c["p_images"]
            for key in ("points", "p", "p images", "wins"):
                row[f"0 steps {key}"] = None
            if "0 steps" in records and "fixed" in records:
                (c,) = compare(root, f"{found['0 steps']}:{method}", f"{found['fixed']}:{method}",
                               [k])
                row["0 steps points"], row["0 steps p"] = c["points"], c["p"]
                row["0 steps p images"], row["0 steps wins"] = c["p_images"], c["a_higher"]
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The rows as a markdown table, each row's best policy in bold."""
    names = [name for name, _ in POLICIES]
    diffs = " | ".join(f"{rule} - support CV" for rule in RULES)
    lines = ["| study | method | shots | " + " | ".join(names) + f" | {diffs} |",
             "|---" * (len(names) + 3 + len(RULES)) + "|"]
    for r in rows:
        scores = {n: r[n] for n in names if r[n] is not None}
        best = max(scores.values()) if scores else None
        cells = ["-" if r[n] is None else
                 (f"**{r[n]:.3f}**" if r[n] == best else f"{r[n]:.3f}") for n in names]
        for rule in RULES:
            points, p = r[f"{rule} points"], format_p_pair(r[f"{rule} p"], r[f"{rule} p images"])
            cells.append("-" if points is None else f"{points:+.1f} (p = {p})")
        lines.append(f"| {r['study']} | {r['method']} | {r['shots']} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def no_fine_tuning_markdown(rows: list[dict[str, object]]) -> str:
    """The fixed steps against no fine-tuning, one markdown row per row that has both."""
    lines = ["| study | method | shots | fixed | 0 steps | 0 steps - fixed | draws where 0 steps "
             "scores higher |", "|---" * 7 + "|"]
    for r in rows:
        if r["0 steps points"] is None:
            continue
        cells = [f"**{r[n]:.3f}**" if r[n] >= r[o] else f"{r[n]:.3f}"
                 for n, o in (("fixed", "0 steps"), ("0 steps", "fixed"))]
        p = format_p_pair(r["0 steps p"], r["0 steps p images"])
        lines.append(f"| {r['study']} | {r['method']} | {r['shots']} | {cells[0]} | {cells[1]} "
                     f"| {r['0 steps points']:+.1f} (p = {p}) | {r['0 steps wins']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", help="base study names (experiments/<name>.toml)")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--no-fine-tuning", action="store_true",
                        help="print the fixed steps against no fine-tuning instead")
    args = parser.parse_args(argv)
    try:
        rows = [row for base in args.studies for row in policy_rows(args.root, base, args.shots)]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(no_fine_tuning_markdown(rows) if args.no_fine_tuning else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
