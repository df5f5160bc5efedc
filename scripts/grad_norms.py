"""The outer (meta-)gradient's norm over meta-training, from finished units' training logs.

    python scripts/grad_norms.py unseen_skin_seed1:maml unseen_skin_seed1:imaml --after 125

prints, per unit, the median norm up to step AFTER and beyond it, the largest norm, and the
fraction of steps beyond AFTER whose norm exceeds 1: enough to tell a stable meta-gradient from an
exploding one (MAML's, back-propagated through its unrolled inner loop).  Reads the ``train_log``
that ``results/<study>/<method>.json`` keeps (``grad_norm`` is logged by every meta-training
step since it was added; older units have none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def norms(root: Path, unit: str) -> np.ndarray:
    """``grad_norm`` of each logged meta-step of ``STUDY:METHOD``, in step order."""
    study, _, method = unit.partition(":")
    path = root / "results" / study / f"{method}.json"
    if not method or not path.is_file():
        raise ValueError(f"{unit}: no finished unit at {path}")
    log = json.loads(path.read_text()).get("train_log") or []
    steps = sorted((r["step"], r["grad_norm"]) for r in log if "grad_norm" in r)
    if not steps:
        raise ValueError(f"{path}: its training log has no grad_norm (trained before it was)")
    return np.array([g for _, g in steps])


def summary(g: np.ndarray, after: int) -> dict[str, float]:
    """Median up to and beyond step ``after``, maximum, and fraction above 1 beyond it."""
    late = g[after:]
    return {
        "steps": len(g),
        "median_early": float(np.median(g[:after])),
        "median_late": float(np.median(late)) if len(late) else float("nan"),
        "max": float(g.max()),
        "late_above_1": float((late > 1).mean()) if len(late) else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("units", nargs="+", help="STUDY:METHOD")
    parser.add_argument("--after", type=int, default=125, help="steps counted as early")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    rows = []
    try:
        for unit in args.units:
            rows.append((unit, summary(norms(args.root, unit), args.after)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"| unit | steps | median, steps 1-{args.after} | median, later | max | "
          "later steps above 1 |")
    print("|---|---|---|---|---|---|")
    for unit, s in rows:
        print(f"| {unit} | {s['steps']} | {s['median_early']:.2f} | {s['median_late']:.2f} | "
              f"{s['max']:.3g} | {100 * s['late_above_1']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
