"""Few-shot evaluation on a target dataset: k-shot draws, scores, statistics.

For every shot count k and draw d, the support set is ``draw_support(target, k, d)`` from the
target's adaptation pool, the same for every method; each method turns it into predictions on a
fixed subset of the target's disjoint test pool, and every image is scored.  A draw's score is
the mean over its test images; statistics are taken over draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm import tqdm

from imaml_seg.config import DataConfig, EvalConfig, InnerConfig, RunConfig, eval_inner
from imaml_seg.data.cache import SegArrays
from imaml_seg.data.tasks import DIHEDRAL, dihedral, draw_support, test_pool, undo_dihedral
from imaml_seg.meta.inner import adapt
from imaml_seg.metrics import all_metrics
from imaml_seg.model import Params, forward


class FewShotMethod(Protocol):
    """Anything that segments query images given a labelled support set."""

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

    @classmethod
    def from_config(
        cls,
        name: str,
        model: nn.Module,
        theta: Params,
        config: RunConfig,
        device: torch.device,
    ) -> AdaptedModel:
        """Adapt as ``config.eval`` says: its steps, optimizer, step size and augmentations,
        with iMAML's proximal term only if ``eval.proximal``."""
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
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        return adapt(
            self.model,
            self.theta,
            support_x.to(self.device),
            support_y.to(self.device),
            self.inner,
            proximal=self.proximal,
            steps=self.steps,
            augment=self.augment,
        ).params

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        params = self.adapt(support_x, support_y)
        return predict_logits(self.model, params, query_x, self.device, tta=self.tta)


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
    """Two-sided p-value of the paired Wilcoxon signed-rank test over draws (same supports)."""
    a = {r["draw"]: r[metric] for r in records if r["method"] == method and r["shots"] == shots}
    b = {r["draw"]: r[metric] for r in records if r["method"] == other and r["shots"] == shots}
    common = sorted(set(a) & set(b))
    diffs = [a[d] - b[d] for d in common]
    if len(common) < 2 or not any(diffs):
        return None
    return float(stats.wilcoxon([a[d] for d in common], [b[d] for d in common]).pvalue)
