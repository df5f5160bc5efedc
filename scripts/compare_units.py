"""Compare two finished units of different studies on their shared support draws.

A study's report tests iMAML against the other methods *of that study*; this compares units
across studies, e.g. iMAML with four times the meta-steps against scratch of the 2x study (scratch
has nothing to train, so the longer studies leave it out).  The two studies must score the same
support draws and test images (same target, resolution, seeds, split and test pool), which is
checked from their study files::

    python scripts/compare_units.py unseen_polyp_4x:imaml unseen_polyp_long:scratch --shots 5 10

prints, per shot count, both means over the shared draws, the difference in Dice points, the
two-sided paired Wilcoxon p-value over draws, and one over test images (each image's Dice averaged
over the shared draws): the draws test how much the comparison depends on the support sets, the
images how much on the test pool; only the latter exists when neither unit used its support set
(e.g. both scored without fine-tuning, so every draw repeats one score).  Reads
``experiments/<study>.toml`` and ``results/<study>/<method>.json`` under ``--root`` (default: the
working directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imaml_seg.config import ConfigError
from imaml_seg.evaluation import paired_wilcoxon, paired_wilcoxon_images
from imaml_seg.experiment import Study


def unit_study(root: Path, unit: str) -> tuple[Study, str]:
    """The study (``experiments/<STUDY>.toml``) and method of ``STUDY:METHOD``."""
    study_name, _, method = unit.partition(":")
    if not method:
        raise ConfigError(f"{unit}: expected STUDY:METHOD")
    return Study.from_file(root / "experiments" / f"{study_name}.toml"), method


def unit_result(root: Path, study: Study, method: str) -> dict:
    """The result JSON of a finished unit (``results/<study>/<method>.json``)."""
    result = root / "results" / study.name / f"{method}.json"
    if not result.is_file():
        raise ConfigError(f"{result}: no finished unit {method} of study {study.name}")
    return json.loads(result.read_text())


def saved_unit_scores(
    root: Path,
    study: Study,
    method: str,
    suffix: str,
    keys: list[str],
    compute: Callable[[Path, list[str]], dict] | None = None,
) -> dict:
    """A unit's scores saved beside its result (``results/<study>/<method><suffix>``), keyed by
    ``keys``: those missing are computed by ``compute(runs, missing)`` from the unit's weights
    under ``runs/`` and saved (written whole, then renamed); without ``compute`` a missing one
    is a ConfigError."""
    path = root / "results" / study.name / f"{method}{suffix}"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    missing = [k for k in keys if k not in saved]
    if missing:
        if compute is None:
            raise ConfigError(f"{path}: nothing saved for {missing[:3]}")
        runs = root / "runs" / (study.train_from or study.name)
        if not (runs / method).is_dir():
            raise ConfigError(f"{study.name}:{method}: no weights under {runs} to score "
                              f"({path} lacks {missing[:3]})")
        saved |= compute(runs, missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=0, sort_keys=True) + "\n")
        tmp.replace(path)
    return saved


def compare(root: Path, a: str, b: str, shots: list[int]) -> list[dict[str, object]]:
    """One row per shot count: means over the shared draws, difference, Wilcoxon p over draws,
    ``p_images`` (Wilcoxon over test images of each image's Dice averaged over the shared draws;
    None without a difference) and ``a_higher``, the draws where ``a`` scores higher."""
    units = [unit_study(root, unit) for unit in (a, b)]
    (sa, _), (sb, _) = units
    sa.check_same_draws(sb)
    records = []  # both units' records, their method renamed "a" and "b"
    for (study, method), label in zip(units, "ab", strict=True):
        records += [{**r, "method": label} for r in unit_result(root, study, method)["records"]]
    rows = []
    for k in shots:
        da = {r["draw"]: r["dice"] for r in records if r["method"] == "a" and r["shots"] == k}
        db = {r["draw"]: r["dice"] for r in records if r["method"] == "b" and r["shots"] == k}
        common = sorted(set(da) & set(db))
        if not common:
            raise ConfigError(f"no {k}-shot draws shared by {a} and {b}")
        mean_a = float(np.mean([da[d] for d in common]))
        mean_b = float(np.mean([db[d] for d in common]))
        rows.append({
            "shots": k,
            "draws": len(common),
            "a": mean_a,
            "b": mean_b,
            "points": 100 * (mean_a - mean_b),
            "p": paired_wilcoxon(records, "a", "b", k),
            "p_images": paired_wilcoxon_images(records, "a", "b", k),
            "a_higher": sum(da[d] > db[d] for d in common),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="STUDY:METHOD")
    parser.add_argument("b", help="STUDY:METHOD")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        rows = compare(args.root, args.a, args.b, args.shots)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"| shots | draws | {args.a} | {args.b} | points | Wilcoxon p (draws) "
          "| Wilcoxon p (images) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p, pi = ("-" if v is None else f"{v:.2g}" for v in (r["p"], r["p_images"]))
        print(f"| {r['shots']} | {r['draws']} | {r['a']:.3f} | {r['b']:.3f} | "
              f"{r['points']:+.1f} | {p} | {pi} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
