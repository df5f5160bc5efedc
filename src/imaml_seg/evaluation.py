"""Few-shot evaluation on a target dataset: k-shot draws, scores, statistics.

For every shot count k and draw d, the support set is ``draw_support(target, k, d)`` from the
target's adaptation pool, the same for every method; each method turns it into predictions on a
fixed subset of the target's disjoint test pool, and every image is scored.  A draw's score is
the mean over its test images; statistics are taken over draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm import tqdm

from imaml_seg.config import (
    SUPPORT_CV_RULES,
    DataConfig,
    EvalConfig,
    InnerConfig,
    RunConfig,
    eval_inner,
)
from imaml_seg.data.cache import SegArrays
from imaml_seg.data.tasks import DIHEDRAL, dihedral, draw_support, test_pool, undo_dihedral
from imaml_seg.meta.inner import adapt
from imaml_seg.metrics import all_metrics, dice
from imaml_seg.model import Params, forward


class FewShotMethod(Protocol):
    """Anything that segments query images given a labelled support set.  One that makes a
    choice per support set may say what it chose in a ``choice`` dict (recorded with each draw's
    scores, e.g. :class:`AdaptedModel`'s steps under support cross-validation)."""

    name: str

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``(Q, 1, H, W)`` for ``query_x`` ``(Q, 3, H, W)``."""
        ...


@dataclass
class AdaptedModel:
    """A learned initialisation ``theta``, fine-tuned on each support set by ``adapt()``."""

    name: str
    model: nn.Module
    theta: Params
    inner: InnerConfig
    steps: int
    proximal: bool = False
    device: torch.device = torch.device("cpu")
    augment: bool = False
    """Flip/rotate the support pairs while adapting (``EvalConfig.augment_support``)."""
    tta: bool = False
    """Average predictions over the 8 flips/rotations of each image (``EvalConfig.tta``)."""
    support_cv: bool = False
    """Choose the number of steps per support set by :func:`support_cv_steps` (``steps`` is then
    the most it may take)."""
    support_cv_rule: str = "best"
    """How :func:`choose_steps` picks among the step counts (one of ``SUPPORT_CV_RULES``); with
    one support pair there is nothing to hold out, and ``steps`` is taken."""
    unadapted: Params | None = None
    """The weights used where no adaptation step is taken (``steps`` 0 or support CV's 0-step
    candidate); None: ``theta`` (``EvalConfig.blend_only_unadapted``)."""
    lam: Params | None = None
    """Per-tensor proximal strengths learned with the weights (``meta.lam_lr``), used in place
    of ``inner.lam`` when ``proximal``."""
    choice: dict[str, Any] = field(default_factory=dict, init=False)
    """What the last :meth:`adapt` chose (``{"inner_steps": n}`` with ``support_cv``, and
    ``"cv_dice"``: each candidate step count's mean held-out Dice); recorded with each draw's
    scores."""

    @classmethod
    def from_config(
        cls,
        name: str,
        model: nn.Module,
        theta: Params,
        config: RunConfig,
        device: torch.device,
        unadapted: Params | None = None,
        lam: Params | None = None,
    ) -> AdaptedModel:
        """Adapt as ``config.eval`` says: its steps, optimizer, step size and augmentations,
        with iMAML's proximal term only if ``eval.proximal`` (with per-tensor strengths ``lam``
        when the run learned them); ``unadapted``: the weights used where no step is taken
        (default ``theta``)."""
        ev = config.eval
        inner = eval_inner(config.inner, ev)
        return cls(
            name,
            model,
            theta,
            inner,
            ev.inner_steps,
            proximal=config.meta.algorithm == "imaml" and ev.proximal,
            device=device,
            augment=ev.augment_support,
            tta=ev.tta,
            support_cv=ev.support_cv,
            support_cv_rule=ev.support_cv_rule,
            unadapted=unadapted,
            lam={k: v.to(device) for k, v in lam.items()} if lam else None,
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        support_x, support_y = support_x.to(self.device), support_y.to(self.device)
        steps = self.steps
        if self.support_cv:
            held_out: dict[int, float] = {}
            if len(support_x) >= 2:
                steps, held_out = support_cv_steps(
                    self.model,
                    self.theta,
                    support_x,
                    support_y,
                    self.inner,
                    candidates_up_to(self.steps),
                    proximal=self.proximal,
                    augment=self.augment,
                    rule=self.support_cv_rule,
                    unadapted=self.unadapted,
                    lam=self.lam,
                )
            self.choice = {"inner_steps": steps}
            if held_out:
                self.choice["cv_dice"] = {str(c): round(v, 5) for c, v in held_out.items()}
        if steps == 0 and self.unadapted is not None:
            return self.unadapted
        return adapt(
            self.model,
            self.theta,
            support_x,
            support_y,
            self.inner,
            proximal=self.proximal,
            steps=steps,
            augment=self.augment,
            lam=self.lam,
        ).params

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        params = self.adapt(support_x, support_y)
        return predict_logits(self.model, params, query_x, self.device, tta=self.tta)


CV_FOLDS = 5
"""At most this many folds in :func:`support_cv_steps` (k shots: min(k, 5) folds)."""


def candidates_up_to(steps: int) -> tuple[int, ...]:
    """The step counts support cross-validation chooses from: 0 (the learned initialisation as
    it is) and ``steps`` halved up to three times, e.g. ``30 -> (0, 3, 7, 15, 30)``."""
    return tuple(sorted({0} | {steps // 2**j for j in range(4)}))


def choose_steps(held_out: dict[int, Tensor], rule: str = "best") -> int:
    """The step count to adapt for, from each candidate's held-out Dice ``(k,)`` (one score per
    held-out support pair, the same pairs for every candidate).

    ``rule='best'``: the best mean (the fewest steps among ties: fine-tuning must earn its
    steps).  ``rule='one_se'``: the fewest steps whose mean is within one standard error of the
    best mean, the standard error being that of the best candidate's k scores
    (``std / sqrt(k)``, Bessel-corrected), Breiman's one-standard-error rule.
    ``rule='paired_se'``: the same on paired differences, the fewest steps whose per-pair deficit
    to the best, ``d = best - c``, has ``mean(d) <= std(d) / sqrt(k)``; the pairs are shared, so
    a deficit seen on every held-out pair counts even when the pairs differ widely in Dice."""
    if rule not in SUPPORT_CV_RULES:
        raise ValueError(f"unknown support CV rule {rule!r}; expected one of {SUPPORT_CV_RULES}")
    means = {c: float(s.mean()) for c, s in held_out.items()}
    best = max(sorted(means), key=lambda c: means[c])
    if rule == "best":
        return best
    k = len(held_out[best])

    def se(x: Tensor) -> float:
        return float(x.std() / k**0.5) if k > 1 else 0.0

    if rule == "one_se":
        return min(c for c in means if means[c] >= means[best] - se(held_out[best]))
    deficits = {c: held_out[best] - s for c, s in held_out.items()}
    return min(c for c, d in deficits.items() if float(d.mean()) <= se(d))


def support_cv_steps(
    model: nn.Module,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    inner: InnerConfig,
    candidates: tuple[int, ...],
    *,
    folds: int = CV_FOLDS,
    proximal: bool = False,
    augment: bool = False,
    rule: str = "best",
    unadapted: Params | None = None,
    lam: Params | None = None,
) -> tuple[int, dict[int, float]]:
    """How many adaptation steps to take on this support set, chosen on the support set alone.

    The k pairs ``(k, 3, H, W)``, ``(k, 1, H, W)`` are split into ``min(k, folds)`` folds (pair
    ``i`` in fold ``i % folds``); for each fold, ``adapt()`` runs on the other pairs for
    ``max(candidates)`` steps and the fold's pairs are scored (Dice of the thresholded
    prediction) after each candidate number of steps.  Returns the candidate :func:`choose_steps`
    picks by ``rule`` (by default the best mean held-out Dice, the fewest steps among ties) and
    the mean Dice of every candidate.  Fine-tuning that lowers held-out Dice, as on a target
    close to the sources, is then skipped; the final adaptation sees all k pairs.  Needs k >= 2.
    ``unadapted``: the 0-step candidate's weights, if not ``theta`` (a blend with the start);
    ``lam``: per-tensor proximal strengths (with ``proximal``), as in ``adapt()``.
    """
    k = len(support_x)
    if k < 2:
        raise ValueError(f"support cross-validation needs at least 2 support pairs, got {k}")
    n_folds = min(k, folds)
    wanted = set(candidates)
    scores: dict[int, list[Tensor]] = {c: [] for c in candidates}
    for f in range(n_folds):
        held = torch.arange(k, device=support_x.device) % n_folds == f
        seen: dict[int, Params] = {}

        def keep(t: int, phi: Params, seen: dict[int, Params] = seen) -> None:
            if t in wanted:
                seen[t] = phi

        result = adapt(
            model,
            theta,
            support_x[~held],
            support_y[~held],
            inner,
            proximal=proximal,
            steps=max(candidates),
            augment=augment,
            observe=keep,
            lam=lam,
        )
        with torch.no_grad():
            for c in candidates:  # steps a non-finite loop never reached: its last finite weights
                params = seen.get(c, result.params)
                if c == 0 and unadapted is not None:
                    params = unadapted
                logits = forward(model, params, support_x[held])
                scores[c].append(dice((logits > 0).float(), support_y[held]).cpu())
    held_out = {c: torch.cat(v) for c, v in scores.items()}
    means = {c: float(v.mean()) for c, v in held_out.items()}
    return choose_steps(held_out, rule), means


@dataclass
class TestTimeAugmented:
    """Any few-shot method with test-time augmentation: its foreground probability averaged
    over the 8 flips/rotations of the query images (the support set is left as it is)."""

    method: FewShotMethod
    __test__ = False  # a library class, not a pytest test class

    @property
    def name(self) -> str:
        return self.method.name

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        return averaged_over_dihedral(lambda x: self.method.predict(support_x, support_y, x),
                                      query_x)


def averaged_over_dihedral(logits_of: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Logits ``(N, 1, H, W)`` of the mean foreground probability of ``logits_of`` over the 8
    flips/rotations of ``images`` ``(N, C, H, W)``, each prediction mapped back first."""
    probs = torch.stack([
        torch.sigmoid(undo_dihedral(logits_of(dihedral(images, c)), c)) for c in DIHEDRAL
    ]).mean(0)
    return torch.logit(probs, eps=1e-6)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    params: Params,
    images: Tensor,
    device: torch.device,
    batch: int = 32,
    *,
    tta: bool = False,
) -> Tensor:
    """Logits ``(N, 1, H, W)`` on the CPU for ``images`` ``(N, 3, H, W)``, in chunks; with
    ``tta``, averaged over the 8 flips/rotations (:func:`averaged_over_dihedral`)."""

    def plain(x: Tensor) -> Tensor:
        outs = [
            forward(model, params, x[i : i + batch].to(device)).cpu()
            for i in range(0, len(x), batch)
        ]
        return torch.cat(outs)

    return averaged_over_dihedral(plain, images) if tta else plain(images)


def evaluate(
    methods: Iterable[FewShotMethod],
    target: SegArrays,
    data: DataConfig,
    config: EvalConfig,
    *,
    seed: int = 0,
    quiet: bool = False,
    on_draw: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Score every method on every (shots, draw); one record per method, shots and draw."""
    methods = list(methods)
    test_x, test_y = test_pool(
        target,
        test_fraction=data.test_fraction,
        split_seed=data.split_seed,
        size=config.test_size,
        seed=seed,
    )
    jobs = [(k, d) for k in config.shots for d in range(config.draws)]
    records = []
    bar = tqdm(total=len(jobs) * len(methods), desc=f"evaluate {target.name}", disable=quiet)
    for k, d in jobs:
        support_x, support_y = draw_support(
            target, k, d, seed=seed, test_fraction=data.test_fraction, split_seed=data.split_seed
        )
        for method in methods:
            logits = method.predict(support_x, support_y, test_x)
            scores = all_metrics((logits > 0).float(), test_y)
            record = {
                "method": method.name,
                "target": target.name,
                "shots": k,
                "draw": d,
                **{m: float(v.mean()) for m, v in scores.items()},
                "dice_per_image": [round(float(v), 5) for v in scores["dice"]],
                **getattr(method, "choice", {}),
            }
            records.append(record)
            if on_draw:
                on_draw(record)
            bar.update(1)
    bar.close()
    return records


def bootstrap_ci(
    values: Iterable[float], *, level: float = 0.95, n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    x = np.asarray(list(values), dtype=np.float64)
    if len(x) < 2:
        return (float(x.mean()), float(x.mean())) if len(x) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarise(records: list[dict], metric: str = "dice") -> dict[tuple[str, int], dict]:
    """Mean, std and 95 % bootstrap CI over draws, keyed by (method, shots)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r[metric])
    out = {}
    for key, values in groups.items():
        lo, hi = bootstrap_ci(values)
        out[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values)),
            "ci_low": lo,
            "ci_high": hi,
            "draws": len(values),
        }
    return out


def paired_wilcoxon(
    records: list[dict], method: str, other: str, shots: int, metric: str = "dice"
) -> float | None:
    """Two-sided p-value of the paired Wilcoxon signed-rank test over draws (same supports).

    None with fewer than 2 common draws, no difference, or when neither method's score varies
    over the draws (both used no support set, e.g. ``inner_steps = 0``): their draws repeat one
    comparison, not independent ones."""
    a = {r["draw"]: r[metric] for r in records if r["method"] == method and r["shots"] == shots}
    b = {r["draw"]: r[metric] for r in records if r["method"] == other and r["shots"] == shots}
    common = sorted(set(a) & set(b))
    diffs = [a[d] - b[d] for d in common]
    if len(common) < 2 or not any(diffs):
        return None
    if len({a[d] for d in common}) == 1 and len({b[d] for d in common}) == 1:
        return None
    return float(stats.wilcoxon([a[d] for d in common], [b[d] for d in common]).pvalue)


def format_p_pair(draws: float | None, images: float | None) -> str:
    """A difference's two p-values as printed in tables: over draws / over test images, ``-``
    for one that does not exist."""
    return " / ".join("-" if p is None else f"{p:.2g}" for p in (draws, images))


def paired_wilcoxon_images(
    records: list[dict], method: str, other: str, shots: int
) -> float | None:
    """Two-sided p-value of the paired Wilcoxon signed-rank test over test images.

    Each image's Dice (``dice_per_image``, ``(images,)`` per record) is averaged over the draws
    both methods scored, and the two ``(images,)`` vectors are paired: the test of how much a
    difference depends on the test pool, the one that exists when neither method used its
    support set.  None without common draws, with test pools of different sizes or no
    difference."""
    a = {r["draw"]: r["dice_per_image"] for r in records
         if r["method"] == method and r["shots"] == shots}
    b = {r["draw"]: r["dice_per_image"] for r in records
         if r["method"] == other and r["shots"] == shots}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    pa = np.mean([a[d] for d in common], axis=0)
    pb = np.mean([b[d] for d in common], axis=0)
    if pa.shape != pb.shape or not np.any(pa != pb):
        return None
    return float(stats.wilcoxon(pa, pb).pvalue)
