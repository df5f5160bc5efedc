"""How much each method's Dice moves from one training run to the next, and whether the gaps
between methods outlast it.

Every study named is the same study retrained with another ``train_seed`` (initial weights, tasks
and batches) and scored on the same support draws (checked from the study files), e.g.::

    python scripts/seed_spread.py unseen_skin unseen_skin_seed1 unseen_skin_seed2 \\
        unseen_skin_seed3 --pairs imaml_warm:transfer imaml:maml --shots 5 10

prints two markdown tables.  Per method and shot count: the mean Dice of each training seed
(over its draws) and the mean and sample standard deviation over the seeds.  Per pair ``A:B``:
the difference in Dice points for each seed, their mean and standard deviation, how many seeds
favour A, and the paired Wilcoxon p-values of the Dice averaged over the seeds that trained both
methods (the seed ensemble's tests; the per-seed tests are in each study's report), over the draws
and over the test images (each image's Dice averaged over the draws too).
A method missing from a study is shown as "-" and left out of that seed's statistics.

One training run's units scored by several studies (the same ``train_seed`` and draws, other
test-time settings: a ``train_from`` study) are named ``A+B``: B's units join A's, each named
``method@rest``, where rest is what B's name adds after the words it shares with A's
(``unseen_polyp_4x_seed0_start03_zeroshot+unseen_polyp_4x_seed0_start03_blendzero`` gives
``imaml_warm@blendzero``), so that ``--pairs imaml_warm@blendzero:transfer`` compares them.

``--readme README.md`` writes the tables between ``<!-- SEEDS: ARGS -->`` and ``<!-- /SEEDS -->``,
where ARGS are this command's other arguments (tests/test_readme.py checks that they stay true).
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
from imaml_seg.evaluation import (  # noqa: E402
    format_p_pair,
    paired_wilcoxon,
    paired_wilcoxon_images,
)
from imaml_seg.experiment import Study  # noqa: E402

Unit = dict[tuple[int, int], dict]  # (shots, draw) -> that draw's record of one unit


def load(root: Path, names: list[str]) -> list[tuple[Study, dict[str, Unit]]]:
    """Each study and its finished units' per-draw records; refuses studies with other draws or
    a training seed given twice."""
    loaded = []
    for name in names:
        study, *others = [Study.from_file(root / "experiments" / f"{part}.toml")
                          for part in name.split("+")]
        units = _units(root, study, "")
        for other in others:
            other.check_same_draws(study)
            if other.config.training_seed != study.config.training_seed:
                raise ConfigError(
                    f"{name}: {other.name} has training seed {other.config.training_seed}, "
                    f"{study.name} {study.config.training_seed}; '+' joins one run's units"
                )
            units.update(_units(root, other, "@" + _rest(study.name, other.name)))
        loaded.append((study, units))
    first = loaded[0][0]
    for study, _ in loaded[1:]:
        study.check_same_draws(first)
    seeds = [study.config.training_seed for study, _ in loaded]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"training seeds {seeds} of {names}: each study needs its own")
    return loaded


def _units(root: Path, study: Study, suffix: str) -> dict[str, Unit]:
    """The per-draw records of ``study``'s finished units, named ``method + suffix``."""
    units = {}
    for method in study.methods:
        result = root / "results" / study.name / f"{method}.json"
        if result.is_file():
            records = json.loads(result.read_text())["records"]
            units[method + suffix] = {(r["shots"], r["draw"]): r for r in records}
    return units


def _rest(first: str, other: str) -> str:
    """The words ('_'-separated) of ``other`` after those it shares with ``first`` from the
    start: ``_rest("a_b_zeroshot", "a_b_blend_cv") == "blend_cv"``."""
    a, b = first.split("_"), other.split("_")
    shared = 0
    while shared < min(len(a), len(b) - 1) and a[shared] == b[shared]:
        shared += 1
    return "_".join(b[shared:])


def _mean(unit: Unit, shots: int, draws: list[int]) -> float:
    return float(np.mean([unit[(shots, d)]["dice"] for d in draws]))


def _draws(units: list[Unit], shots: int) -> list[int]:
    """The draws at ``shots`` that every unit scored."""
    common = set.intersection(*({d for k, d in u if k == shots} for u in units))
    return sorted(common)


def method_rows(
    loaded: list[tuple[Study, dict[str, Unit]]], methods: list[str], shots: list[int]
) -> list[dict[str, object]]:
    """Per method and shot count: each seed's mean Dice (None where not run), mean and sd."""
    rows = []
    for method in methods:
        for k in shots:
            per_seed: list[float | None] = []
            for _, units in loaded:
                unit = units.get(method)
                draws = _draws([unit], k) if unit else []
                per_seed.append(_mean(unit, k, draws) if draws else None)
            values = [v for v in per_seed if v is not None]
            rows.append({
                "method": method,
                "shots": k,
                "per_seed": per_seed,
                "mean": float(np.mean(values)) if values else None,
                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            })
    return rows


def pair_rows(
    loaded: list[tuple[Study, dict[str, Unit]]], pairs: list[tuple[str, str]], shots: list[int]
) -> list[dict[str, object]]:
    """Per pair ``(a, b)`` and shot count: each seed's difference in points, mean, sd, how many
    seeds favour ``a``, and the Wilcoxon p of the seed-averaged Dice over draws (``p``) and over
    test images (``p_images``)."""
    rows = []
    for a, b in pairs:
        both = [(u[a], u[b]) for _, u in loaded if a in u and b in u]
        for k in shots:
            per_seed: list[float | None] = []
            for _, units in loaded:
                if a in units and b in units:
                    draws = _draws([units[a], units[b]], k)
                    diff = _mean(units[a], k, draws) - _mean(units[b], k, draws)
                    per_seed.append(100 * diff)
                else:
                    per_seed.append(None)
            values = [v for v in per_seed if v is not None]
            p = p_images = None
            if both:
                draws = _draws([u for pair in both for u in pair], k)
                averaged = [
                    {"method": m, "shots": k, "draw": d,
                     "dice": float(np.mean([pair[i][(k, d)]["dice"] for pair in both])),
                     "dice_per_image": np.mean(
                         [pair[i][(k, d)]["dice_per_image"] for pair in both], axis=0)}
                    for i, m in enumerate((a, b)) for d in draws
                ]
                p = paired_wilcoxon(averaged, a, b, k)
                p_images = paired_wilcoxon_images(averaged, a, b, k)
            rows.append({
                "pair": f"{a} - {b}",
                "shots": k,
                "per_seed": per_seed,
                "mean": float(np.mean(values)) if values else None,
                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "favour": sum(v > 0 for v in values),
                "seeds": len(values),
                "p": p,
                "p_images": p_images,
            })
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(
    loaded: list[tuple[Study, dict[str, Unit]]],
    methods: list[dict[str, object]],
    pairs: list[dict[str, object]],
) -> str:
    """Both tables, one column per training seed."""
    seeds = " | ".join(f"seed {s.config.training_seed}" for s, _ in loaded)
    dashes = "|---" * len(loaded)
    lines = [f"| method | shots | {seeds} | mean +- sd |", f"|---|---{dashes}|---|"]
    for r in methods:
        cells = " | ".join(_cell(v, ".3f") for v in r["per_seed"])
        lines.append(
            f"| {r['method']} | {r['shots']} | {cells} | "
            f"{_cell(r['mean'], '.3f')} +- {_cell(r['sd'], '.3f')} |"
        )
    lines += ["", f"| difference (points) | shots | {seeds} | mean +- sd | seeds > 0 | "
              "Wilcoxon p, seed-averaged: draws / images |", f"|---|---{dashes}|---|---|---|"]
    for r in pairs:
        cells = " | ".join(_cell(v, "+.1f") for v in r["per_seed"])
        lines.append(
            f"| {r['pair']} | {r['shots']} | {cells} | {_cell(r['mean'], '+.1f')} +- "
            f"{_cell(r['sd'], '.1f')} | {r['favour']}/{r['seeds']} | "
            f"{format_p_pair(r['p'], r['p_images'])} |"
        )
    return "\n".join(lines)


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """Each ``<!-- SEEDS: ARGS -->`` block of a README: its arguments and its tables."""
    return readme_block.blocks(text, "SEEDS")


def tables(args: argparse.Namespace) -> str:
    """Both tables for parsed arguments (raises ConfigError on bad input)."""
    pairs = []
    for pair in args.pairs:
        a, _, b = pair.partition(":")
        if not a or not b:
            raise ConfigError(f"--pairs {pair}: expected A:B")
        pairs.append((a, b))
    loaded = load(args.root, args.studies)
    methods = args.methods or list(dict.fromkeys(m for s, _ in loaded for m in s.methods))
    rows = method_rows(loaded, methods, args.shots)
    return markdown(loaded, rows, pair_rows(loaded, pairs, args.shots))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", help="the same study with different train_seed")
    parser.add_argument("--methods", nargs="+", help="default: every method of the studies")
    parser.add_argument("--pairs", nargs="*", default=[], help="A:B, e.g. imaml:maml")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--readme", type=Path, help="write the tables into this README's block")
    return parser


def main(argv: list[str] | None = None) -> int:
    return readme_block.run(argv, parser(), tables, "SEEDS")


if __name__ == "__main__":
    sys.exit(main())
