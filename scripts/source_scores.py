"""Score two methods' trained weights without fine-tuning on each source's held-out images and on
the target's test pool: does a lead on the sources foretell the lead on the unseen target?

A rule that picks a starting point (for example warm iMAML's over transfer's) may only look at
the sources.  For each training study named, this scores both methods' weights as they are (no
adaptation, no support set) on every source dataset's test pool (images meta-training and
pretraining never drew: tasks and batches come from the adaptation pools) and on the target's
whole test pool, and prints one row per study: each method's mean Dice per dataset and the
difference in points.  The last row gives, per source and for the mean over sources, the Spearman
rank correlation over the studies between that source's difference and the target's.
``--rule DATASET POINTS`` adds how a choice made on the sources alone scores on the target: A's
weights where A leads B on DATASET's held-out images by more than POINTS, else B's::

    python scripts/source_scores.py unseen_polyp_4x_seed0_start03 \\
        unseen_polyp_4x_seed1_start03 --methods imaml_warm transfer --rule Kvasir-SEG 1

``--sources-only`` never loads or reads the target, so a prediction can be written down before the
target is scored: the table has only the sources' columns, and with ``--rule`` one line per study
says which weights the rule keeps and, from the ``--reference`` studies (scored on the target
too), the target's lead that the study's rank on DATASET implies::

    python scripts/source_scores.py unseen_polyp_4x_seed5_start03 --sources-only \\
        --rule Kvasir-SEG 1 --reference unseen_polyp_4x_seed0_start03 ...

A method named ``METHOD@REST`` is ``METHOD`` of study ``<STUDY>_<REST>``, which scores STUDY's
trained weights (``train_from``) with ``[eval]`` settings that change them (``start_blend``)
or how they predict (``tta``), or trains them further (``extend_from``, also through a chain of
such studies): ``--methods imaml_warm@blendzero transfer`` compares warm iMAML blended with its
start (``unseen_polyp_4x_seed0_start03_blendzero``) with transfer as trained;
``--methods imaml_warm@transfer_swa6000_warm300 transfer@transfer_swa6000`` compares warm iMAML
meta-trained from averaged transfer weights with those weights.

The studies must share sources, target and resolution.  Weights are read from
``runs/<study>/<method>`` below ``--root``; each method's per-image Dice is saved beside its
result (``results/<study>/<method>.sources.json``) the first time, so the table can be printed
again without weights or images.  ``--readme README.md`` writes it between ``<!-- SOURCESCORES:
ARGS -->`` and ``<!-- /SOURCESCORES -->`` (ARGS: the other arguments; tests/test_readme.py checks
that they stay true).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block  # noqa: E402
from compare_units import saved_unit_scores  # noqa: E402

from imaml_seg.checkpoint import (  # noqa: E402
    CheckpointError,
    blend_with_start,
    load_checkpoint,
)
from imaml_seg.config import ConfigError, RunConfig  # noqa: E402
from imaml_seg.data.cache import SegArrays  # noqa: E402
from imaml_seg.data.tasks import test_pool  # noqa: E402
from imaml_seg.evaluation import predict_logits  # noqa: E402
from imaml_seg.experiment import TUNED, Study, method_config, tuned_choice  # noqa: E402
from imaml_seg.metrics import dice  # noqa: E402
from imaml_seg.model import build_model  # noqa: E402

TAG = "SOURCESCORES"
BATCH = 32
"""Images per forward pass (memory stays flat at any resolution)."""
NEIGHBOURS = 2
"""Reference studies nearest in the rule dataset's lead on each side that bound a prediction."""
SOURCES = ".sources.json"
"""Suffix of a method's per-image Dice per dataset (``results/<study>/<method>.sources.json``)."""


def _pools(study: Study) -> tuple:
    """What decides the images scored: the datasets, their resolution and test pools."""
    c = study.config
    return (c.sources, c.target, c.data.resolution, c.data.test_fraction, c.data.split_seed)


def load_studies(root: Path, names: list[str]) -> list[Study]:
    """The studies ``experiments/<name>.toml``; all must share sources, target, resolution and
    test split, so every study is scored on the same images."""
    studies = [Study.from_file(root / "experiments" / f"{name}.toml") for name in names]
    first = studies[0].config
    for study in studies[1:]:
        if _pools(study) != _pools(studies[0]):
            c = study.config
            raise ConfigError(
                f"{study.name}: sources, target or resolution differ, or the test split does, "
                f"from {studies[0].name}'s ({list(c.sources)} -> {c.target} at "
                f"{c.data.resolution} px, test fraction {c.data.test_fraction}, split seed "
                f"{c.data.split_seed} against {list(first.sources)} -> {first.target} at "
                f"{first.data.resolution} px, {first.data.test_fraction}, {first.data.split_seed})"
            )
    return studies


@torch.no_grad()
def weights_dice(
    runs: Path, method: str, datasets: dict[str, SegArrays], config: RunConfig
) -> dict[str, list[float]]:
    """``{name: Dice of each test-pool image}`` of the weights in ``runs/<method>`` on each of
    ``datasets`` (``{name: arrays}``; test pools as ``config.data`` splits them), predicted as
    they are (sigmoid > 0.5, no adaptation), blended with their start first where
    ``config.eval.start_blend`` says so and averaged over the 8 flips/rotations of each image
    where ``config.eval.tta`` does."""
    try:
        checkpoint = load_checkpoint(runs / method)
        theta = blend_with_start(checkpoint.theta, config)
    except CheckpointError as err:
        raise ConfigError(str(err)) from err
    model = build_model(checkpoint.config.model)
    out = {}
    for name, arrays in datasets.items():
        x, y = test_pool(arrays, test_fraction=config.data.test_fraction,
                         split_seed=config.data.split_seed)
        scores = []
        for start in range(0, len(x), BATCH):
            batch = slice(start, start + BATCH)
            logits = predict_logits(model, theta, x[batch], torch.device("cpu"), batch=BATCH,
                                    tta=config.eval.tta)
            pred = (torch.sigmoid(logits) > 0.5).float()
            scores += dice(pred, y[batch]).flatten().tolist()
        out[name] = [round(v, 6) for v in scores]
    return out


def method_scores(
    root: Path, study: Study, method: str, load: Callable[[str], SegArrays] | None = None,
    *, target: bool = True,
) -> dict[str, list[float]]:
    """Per-image Dice per dataset (sources, then the target unless ``target=False``) of
    ``study``'s ``method`` (``METHOD@REST``: :func:`rescoring`): read from its
    ``.sources.json``, else computed from its weights (``load(name)`` gives a dataset's arrays)
    and saved."""
    study, method = rescoring(root, study, method)
    config = study.config
    names = [*config.sources, config.target] if target else list(config.sources)

    def compute(runs: Path, missing: list[str]) -> dict[str, list[float]]:
        results = root / "results" / study.name
        if study.tune_stages and not (results / f"{method}{TUNED}").is_file():
            raise ConfigError(f"{study.name}:{method}: not tuned yet; run the study first")
        chosen = tuned_choice(results, method)  # a start_blend chosen on the sources
        if "per_shot" in chosen:
            raise ConfigError(f"{study.name}:{method}: settings chosen per shot count; which "
                              "weights to score is ambiguous")
        return weights_dice(runs, method, {n: load(n) for n in missing},
                            method_config(study, method, runs, chosen))

    saved = saved_unit_scores(root, study, method, SOURCES, names,
                              None if load is None else compute)
    return {n: saved[n] for n in names}


def rescoring(root: Path, study: Study, method: str) -> tuple[Study, str]:
    """``(study, method)``, or for ``METHOD@REST`` the study ``<study>_<REST>`` and ``METHOD``:
    a study derived from ``study`` that scores its trained weights with other ``[eval]``
    settings (``train_from``) or trains them further (``extend_from``), directly or through
    studies derived from it in turn."""
    name, _, rest = method.partition("@")
    if not rest:
        return study, method
    folder = root / "experiments"
    again = Study.from_file(folder / f"{study.name}_{rest}.toml")
    chain, link = [again.name], again
    while link.name != study.name and (link.train_from or link.extend_from) not in (None, *chain):
        link = Study.from_file(folder / f"{link.train_from or link.extend_from}.toml")
        chain.append(link.name)
    if link.name != study.name or name not in again.methods:
        raise ConfigError(
            f"{method}: {again.name} does not score {study.name}'s {name} (it needs "
            f"train_from or extend_from leading to '{study.name}', found {' <- '.join(chain)}, "
            f"and {name} in its methods)")
    if _pools(again) != _pools(study):
        raise ConfigError(f"{method}: {again.name} scores other images than {study.name}")
    return again, name


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (nan with fewer than three pairs or a
    constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _lead(sa: dict, sb: dict, dataset: str) -> float:
    """A's lead over B on ``dataset`` in points."""
    return 100 * (float(np.mean(sa[dataset])) - float(np.mean(sb[dataset])))


def table(
    studies: list[Study], scores: list[tuple[dict, dict]], methods: list[str], *,
    target: bool = True,
) -> str:
    """Markdown: per study, each dataset's mean Dice of the two methods and their difference;
    then each source's rank correlation with the target's difference over the studies (without
    ``target``: the sources' columns only)."""
    config = studies[0].config
    sources = list(config.sources)
    goal = [config.target] if target else []
    first = scores[0][0]
    a, b = methods
    head = [f"{n} ({len(first[n])} images)" for n in sources] + ["sources' mean"]
    head += [f"{n}, target ({len(first[n])} images)" for n in goal]
    lines = [f"| study: {a} / {b} (difference, points) | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]
    diffs: dict[str, list[float]] = {n: [] for n in [*sources, "mean", *goal]}
    for study, (sa, sb) in zip(studies, scores, strict=True):
        cells = []
        for n in [*sources, *goal]:
            ma, mb = float(np.mean(sa[n])), float(np.mean(sb[n]))
            diffs[n].append(100 * (ma - mb))
            cells.append(f"{ma:.3f} / {mb:.3f} ({100 * (ma - mb):+.1f})")
        diffs["mean"].append(float(np.mean([diffs[n][-1] for n in sources])))
        cells.insert(len(sources), f"{diffs['mean'][-1]:+.1f}")
        lines.append(f"| {study.name} | " + " | ".join(cells) + " |")
    if len(studies) > 1:
        lines.append(f"| difference over the {len(studies)} studies, mean +- sd | " + " | ".join(
            f"{np.mean(diffs[n]):+.1f} +- {np.std(diffs[n], ddof=1):.1f}"
            for n in [*sources, "mean", *goal]) + " |")
    if not goal:
        return "\n".join(lines)
    rho = [spearman(diffs[n], diffs[goal[0]]) for n in [*sources, "mean"]]
    lines.append(f"| rank correlation with the target's difference ({len(studies)} studies) | "
                 + " | ".join("-" if np.isnan(r) else f"{r:+.2f}" for r in rho) + " | |")
    return "\n".join(lines)


def rule(
    studies: list[Study], scores: list[tuple[dict, dict]], methods: list[str], dataset: str,
    points: float,
) -> str:
    """One line: the rule "keep A's weights where A leads B on ``dataset``'s held-out images by
    more than ``points``, else B's", scored on the target's test pool against always-B and
    always-A (mean +- sd over the studies of the per-study difference in points)."""
    target = studies[0].config.target
    if dataset not in scores[0][0]:
        raise ConfigError(f"--rule: {dataset} is not one of {list(scores[0][0])}")
    a, b = methods
    kept, policy, always_a, always_b = [], [], [], []
    for sa, sb in scores:
        kept.append(_lead(sa, sb, dataset) > points)
        always_a.append(float(np.mean(sa[target])))
        always_b.append(float(np.mean(sb[target])))
        policy.append(always_a[-1] if kept[-1] else always_b[-1])

    def versus(other: list[float]) -> str:
        d = 100 * (np.array(policy) - np.array(other))
        sd = f" +- {d.std(ddof=1):.1f}" if len(d) > 1 else ""
        return f"{d.mean():+.1f}{sd}"

    names = ", ".join(st.name for st, k in zip(studies, kept, strict=True) if k) or "none"
    return (f"Rule: keep {a} where it leads {b} on {dataset} by more than {points:g} "
            f"point{'' if points == 1 else 's'}, "
            f"else {b}: {a} kept on {sum(kept)} of {len(kept)} studies ({names}); on {target} "
            f"the rule's weights score {np.mean(policy):.3f} ({b} {np.mean(always_b):.3f}, "
            f"{a} {np.mean(always_a):.3f}): {versus(always_b)} points over always {b}, "
            f"{versus(always_a)} over always {a} (mean +- sd over the studies).")


def predict(
    studies: list[Study], scores: list[tuple[dict, dict]], methods: list[str], dataset: str,
    points: float, references: list[tuple[float, float]],
) -> str:
    """One line per study, from the sources alone: A's lead over B on ``dataset``, the weights the
    rule keeps, and, from ``references`` (each reference study's ``(lead on dataset, lead on the
    target)``), the target lead implied by rank: between the least and the greatest target lead
    of the NEIGHBOURS references nearest below and the NEIGHBOURS nearest above on ``dataset``
    (open-ended where there are none on one side)."""
    if dataset not in scores[0][0]:
        raise ConfigError(f"--rule: {dataset} is not one of {list(scores[0][0])}")
    a, b = methods
    target = studies[0].config.target
    ordered = sorted(references)
    lines = []
    for study, (sa, sb) in zip(studies, scores, strict=True):
        lead = _lead(sa, sb, dataset)
        keep = a if lead > points else b
        line = (f"Prediction for {study.name}: {a} leads {b} on {dataset} by {lead:+.1f} points "
                f"({np.mean(sa[dataset]):.3f} / {np.mean(sb[dataset]):.3f}), "
                f"{'more' if keep == a else 'not more'} than {points:g}: the rule keeps {keep}.")
        if references:
            below = [r for r in ordered if r[0] <= lead][-NEIGHBOURS:]
            above = [r for r in ordered if r[0] > lead][:NEIGHBOURS]
            goals = [t for _, t in below + above]
            if below and above:
                span = f"from {min(goals):+.1f} to {max(goals):+.1f} points"
            elif below:
                span = f"{min(goals):+.1f} points or more"
            else:
                span = f"{max(goals):+.1f} points or less"
            named = "; ".join(f"{d:+.1f} -> {t:+.1f}" for d, t in below + above)
            line += (f" By rank among {len(references)} reference studies (the {NEIGHBOURS} "
                     f"nearest on each side, {dataset} -> {target} lead: {named}), {a}'s lead "
                     f"on {target} should be {span}.")
        lines.append(line)
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", help="training studies (experiments/<STUDY>.toml)")
    p.add_argument("--methods", nargs=2, default=["imaml_warm", "transfer"],
                   metavar=("A", "B"), help="the two methods compared (A - B)")
    p.add_argument("--rule", nargs=2, metavar=("DATASET", "POINTS"),
                   help="also score the rule: A's weights where A leads B on DATASET by more "
                   "than POINTS, else B's")
    p.add_argument("--sources-only", action="store_true",
                   help="score the sources only (the target is never loaded): with --rule, "
                   "predict each study's choice before its target is scored")
    p.add_argument("--reference", nargs="+", default=[], metavar="STUDY",
                   help="with --sources-only and --rule: studies scored on the target too, whose "
                   "ranks bound each prediction")
    readme_block.add_data_args(p)
    return p


def make(args: argparse.Namespace, *, compute: bool = True) -> str:
    """The table for ``args``; with ``compute=False`` only from saved scores."""
    if args.reference and not (args.sources_only and args.rule):
        raise ConfigError("--reference needs --sources-only and --rule")
    studies = load_studies(args.root, args.studies + args.reference)
    references = studies[len(args.studies):]
    studies = studies[:len(args.studies)]
    if overlap := sorted({s.name for s in studies} & {s.name for s in references}):
        raise ConfigError(f"--reference: {overlap[0]} is also a study to predict")
    load = readme_block.dataset_loader(args, studies[0].config.data.resolution)
    target = not args.sources_only

    def scored(group: list[Study], with_target: bool) -> list[tuple[dict, dict]]:
        return [tuple(method_scores(args.root, s, m, load if compute else None,
                                    target=with_target)
                      for m in args.methods) for s in group]

    scores = scored(studies, target)
    out = table(studies, scores, args.methods, target=target)
    if args.rule:
        try:
            points = float(args.rule[1])
        except ValueError:
            raise ConfigError(f"--rule: POINTS must be a number, got {args.rule[1]!r}") from None
        if target:
            out += "\n\n" + rule(studies, scores, args.methods, args.rule[0], points)
        else:
            goal = studies[0].config.target
            leads = [(_lead(sa, sb, args.rule[0]), _lead(sa, sb, goal))
                     for sa, sb in scored(references, True)]
            out += "\n\n" + predict(studies, scores, args.methods, args.rule[0], points, leads)
    return out


def readme_blocks(text: str) -> list[tuple[list[str], str]]:
    """The README's source-score tables: each one's arguments and body."""
    return readme_block.blocks(text, TAG)


def main(argv: list[str] | None = None) -> int:
    return readme_block.run(argv, parser(), make, TAG)


if __name__ == "__main__":
    raise SystemExit(main())
