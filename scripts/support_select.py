"""Choose, per support set, the starting point (and steps) that does best on that support set.

Two kinds of candidates, both finished units.  One scored without fine-tuning (``[eval]
inner_steps = 0``) predicts with its learned weights as they are, so it has not seen the support
set, and its Dice on the k support pairs is a held-out score that needs no labels beyond the
shots; it is computed from the unit's weights.  One scored with support cross-validation's
best-mean rule (``support_cv = true``) recorded each candidate step count's mean held-out Dice
per draw (``cv_dice``), and its score is the best of them, the steps it took.  Without
fine-tuning a unit's held-out Dice over the folds is its support Dice, so both kinds compare
alike: the policy is support cross-validation over every (starting point, steps) pair.  For
every draw it keeps the candidate with the best score (the first listed among ties), and its
score on that draw is the chosen unit's recorded score on the test images, so the policy is
scored on exactly the draws and images of the units.  Typical candidates: checkpoints of one
meta-training run and its warm start, whose scores without fine-tuning swing between
checkpoints::

    python scripts/support_select.py unseen_polyp_4x_seed2_zeroshot:transfer \\
        unseen_polyp_4x_seed2_warm300:imaml_warm unseen_polyp_4x_seed2_zeroshot:imaml_warm \\
        --shots 1 5 10

prints, per shot count, each candidate's mean Dice and how often it was chosen, the policy's mean,
and the policy against each candidate (points, paired Wilcoxon p over draws / over test images).
Reads ``experiments/`` and ``results/`` below ``--root`` (default: the working directory).  The
support Dice of a unit without fine-tuning is saved beside its result
(``results/<study>/<method>.support.json``) the first time, from its weights under ``runs/`` and
the target's images (``--data-root``), so the table can be printed again without either.
``--readme README.md`` writes it between ``<!-- SUPPORTSELECT: ARGS -->`` and ``<!--
/SUPPORTSELECT -->`` (ARGS: the other arguments; tests/test_readme.py checks that they stay
true).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block  # noqa: E402
from compare_units import saved_unit_scores, unit_result, unit_study  # noqa: E402

from imaml_seg.baselines import BASELINES  # noqa: E402
from imaml_seg.config import ConfigError  # noqa: E402
from imaml_seg.data.cache import SegArrays  # noqa: E402
from imaml_seg.data.tasks import draw_support  # noqa: E402
from imaml_seg.evaluation import format_p_pair, paired_wilcoxon, paired_wilcoxon_images  # noqa: E402
from imaml_seg.experiment import Study, load_method  # noqa: E402
from imaml_seg.meta.trainer import device_default  # noqa: E402
from imaml_seg.metrics import dice  # noqa: E402

POLICY = "policy"
TAG = "SUPPORTSELECT"
SUPPORT = ".support.json"
"""Suffix of a unit's support Dice per draw (``results/<study>/<method>.support.json``)."""


def choose(support_dice: list[float]) -> int:
    """The index of the best support Dice (the first among ties)."""
    return int(np.argmax(support_dice))


def load_candidates(root: Path, units: list[str]) -> list[tuple[Study, str, dict]]:
    """``(study, method, result JSON)`` of each ``STUDY:METHOD``; all must score the same draws
    and none may have fine-tuned on its support set."""
    out = []
    for unit in units:
        study, method = unit_study(root, unit)
        if method in BASELINES:
            raise ConfigError(f"{unit}: {method} reads its support set as an input, so its Dice "
                              "on the support pairs is not a held-out score")
        payload = unit_result(root, study, method)
        path = root / "results" / study.name / f"{method}.json"
        ev = payload.get("eval", {})
        cross_validated = ev.get("support_cv") and ev.get("support_cv_rule", "best") == "best"
        if ev.get("inner_steps") != 0 and not cross_validated:
            raise ConfigError(
                f"{path}: {unit} fine-tunes on its support set ([eval] inner_steps is not 0) "
                "without support CV's best-mean rule, so it has no held-out score on it"
            )
        if out:
            out[0][0].check_same_draws(study)
        out.append((study, method, payload))
    return out


@torch.no_grad()
def unit_support_dice(
    runs: Path, study: Study, method: str, target: SegArrays, shots: list[int]
) -> dict[str, float]:
    """``{"<shots>:<draw>": mean Dice of the unit's prediction on that draw's support pairs}``,
    from its weights under ``runs`` (the draws as :func:`imaml_seg.evaluation.evaluate` makes
    them)."""
    wrapper = load_method(study, method, runs, device_default())
    config = study.config
    out = {}
    for k in shots:
        for d in range(config.eval.draws):
            x, y = draw_support(target, k, d, seed=config.seed,
                                test_fraction=config.data.test_fraction,
                                split_seed=config.data.split_seed)
            out[f"{k}:{d}"] = float(dice((wrapper.predict(x, y, x) > 0).float(), y).mean())
    return out


def cv_scores(study: Study, method: str, records: list[dict], shots: list[int]
              ) -> dict[str, float]:
    """``{"<shots>:<draw>": best mean held-out Dice}`` of a unit scored with support CV."""
    out = {}
    for r in records:
        if r["shots"] in shots:
            if "cv_dice" not in r:
                raise ConfigError(
                    f"{study.name}:{method}: no held-out Dice recorded for {r['shots']}-shot "
                    "draws (one shot cannot be split; units scored before session 21 did not "
                    "record it: score them again)"
                )
            out[f"{r['shots']}:{r['draw']}"] = max(r["cv_dice"].values())
    return out


def support_scores(
    root: Path,
    candidates: list[tuple[Study, str, dict]],
    shots: list[int],
    load_target: Callable[[], SegArrays] | None = None,
) -> dict[tuple[int, int], list[float]]:
    """``{(shots, draw): [each candidate's held-out score on that draw's support set]}``: for a
    unit with support CV its best mean held-out Dice, else its mean Dice on the support pairs,
    read from its ``.support.json``; missing ones are computed (``load_target()`` gives the
    target's arrays) and saved."""
    per_unit = []
    for study, method, payload in candidates:
        if payload["eval"]["inner_steps"] != 0:
            per_unit.append(cv_scores(study, method, payload["records"], shots))
            continue
        def compute(runs: Path, missing: list[str], study=study, method=method) -> dict:
            todo = sorted({int(key.split(":")[0]) for key in missing})
            return unit_support_dice(runs, study, method, load_target(), todo)

        keys = [f"{k}:{d}" for k in shots for d in range(study.config.eval.draws)]
        saved = saved_unit_scores(root, study, method, SUPPORT, keys,
                                  None if load_target is None else compute)
        per_unit.append(saved)
    draws = candidates[0][0].config.eval.draws
    for (study, method, _), unit in zip(candidates, per_unit, strict=True):
        lacking = [f"{k}:{d}" for k in shots for d in range(draws) if f"{k}:{d}" not in unit]
        if lacking:
            raise ConfigError(f"{study.name}:{method}: no score of (shots:draw) {lacking[:3]}")
    return {(k, d): [u[f"{k}:{d}"] for u in per_unit] for k in shots for d in range(draws)}


def select(
    records: list[list[dict]], scores: dict[tuple[int, int], list[float]]
) -> list[dict]:
    """The candidates' records (method renamed ``c0``, ``c1``, ...) and the policy's: on each
    scored draw, the record of the candidate :func:`choose` picks, with ``chosen`` its index."""
    out = []
    for i, unit in enumerate(records):
        out += [{**r, "method": f"c{i}"} for r in unit]
    by_key = {(r["method"], r["shots"], r["draw"]): r for r in out}
    for (k, d), s in sorted(scores.items()):
        i = choose(s)
        if (f"c{i}", k, d) not in by_key:
            raise ConfigError(f"candidate {i} has no record of {k}-shot draw {d}")
        out.append({**by_key[(f"c{i}", k, d)], "method": POLICY, "chosen": i})
    return out


def table(units: list[str], records: list[dict], shots: list[int]) -> str:
    """Markdown: per shot count and candidate, its mean Dice, the draws it was chosen on, and
    the policy against it (points, p over draws / over test images)."""
    lines = ["| shots | candidate | Dice | chosen on | policy - candidate (points) | "
             "Wilcoxon p: draws / images |", "|---|---|---|---|---|---|"]
    for k in shots:
        policy = [r for r in records if r["method"] == POLICY and r["shots"] == k]
        mean_policy = float(np.mean([r["dice"] for r in policy]))
        for i, unit in enumerate(units):
            mine = [r["dice"] for r in records if r["method"] == f"c{i}" and r["shots"] == k]
            chosen = sum(r["chosen"] == i for r in policy)
            points = 100 * (mean_policy - float(np.mean(mine)))
            p = format_p_pair(paired_wilcoxon(records, POLICY, f"c{i}", k),
                              paired_wilcoxon_images(records, POLICY, f"c{i}", k))
            lines.append(f"| {k} | {unit} | {np.mean(mine):.3f} | {chosen}/{len(policy)} | "
                         f"{points:+.1f} | {p} |")
        lines.append(f"| {k} | **chosen on the support set** | **{mean_policy:.3f}** | | | |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("units", nargs="+", help="STUDY:METHOD, at least two")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    readme_block.add_data_args(p)
    return p


def make(args: argparse.Namespace, *, compute: bool = True) -> str:
    """The table for ``args``; with ``compute=False`` only from saved support scores."""
    if len(args.units) < 2:
        raise ConfigError("give at least two units to choose between")
    candidates = load_candidates(args.root, args.units)
    config = candidates[0][0].config
    load = readme_block.dataset_loader(args, config.data.resolution)

    def load_target() -> SegArrays:
        return load(config.target)

    scores = support_scores(args.root, candidates, args.shots, load_target if compute else None)
    return table(args.units, select([c[2]["records"] for c in candidates], scores), args.shots)


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """The README's support-selection tables: each one's arguments and body."""
    return readme_block.blocks(text, TAG)


def main(argv: list[str] | None = None) -> int:
    return readme_block.run(argv, parser(), make, TAG)


if __name__ == "__main__":
    sys.exit(main())
