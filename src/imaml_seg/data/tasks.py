"""Few-shot tasks: k support + q query pairs drawn from one dataset.

Shapes are channel-first: images ``(N, 3, R, R)`` float32, masks ``(N, 1, R, R)`` float32 in {0, 1}.

Every dataset is split once, by a seeded permutation, into an **adaptation pool** (where support
and query sets come from) and a disjoint **test pool** (scored only).  Source datasets use their
adaptation pool too, so no test image is ever seen, not even as a source during meta-training.

Randomness is keyed, not streamed: a task is a function of ``(seed, step, index)`` alone
(``np.random.default_rng([seed, step, index])``), so the tasks of a meta-batch do not depend on how
they are spread over processes or on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from imaml_seg.data.cache import SegArrays
from imaml_seg.data.shift import shift_task
from imaml_seg.data.validate import DataError

POOLS = ("adapt", "test")
_POOLED_STREAM = 0x706F6F6C  # keeps pooled_batch's randomness apart from TaskSampler's


@dataclass(frozen=True)
class Task:
    """One episode: adapt on the support set, score (or meta-learn) on the query set."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    dataset: str = ""


def split_pools(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(adaptation pool, test pool)`` of ``n`` images: disjoint, sorted, covering 0..n-1.

    The test pool takes ``round(n * test_fraction)`` images, but both pools keep at least one.
    """
    if n < 2:
        raise DataError(f"a dataset needs at least 2 images to split into adaptation and test "
                        f"pools, it has {n}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _dihedral(x: np.ndarray, y: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 flips/90-degree rotations of ``(C, R, R)`` arrays, the same for both."""
    if code & 4:
        x, y = x[..., ::-1], y[..., ::-1]
    k = code & 3
    return np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))


DIHEDRAL = tuple(range(8))
"""Codes of the 8 flips/90-degree rotations of a square: bit 2 flips the last axis, then the
low two bits count quarter turns."""


def dihedral(x: Tensor, code: int) -> Tensor:
    """Transform ``(..., R, R)`` tensors by dihedral ``code`` (as ``_dihedral`` does arrays)."""
    if code & 4:
        x = x.flip(-1)
    return torch.rot90(x, code & 3, dims=(-2, -1))


def undo_dihedral(x: Tensor, code: int) -> Tensor:
    """The inverse of :func:`dihedral`: ``undo_dihedral(dihedral(x, c), c) == x``."""
    x = torch.rot90(x, -(code & 3), dims=(-2, -1))
    return x.flip(-1) if code & 4 else x


def _gather(arrays: SegArrays, index: np.ndarray, rng: np.random.Generator | None
            ) -> tuple[Tensor, Tensor]:
    """Images and masks ``index`` as float32 tensors, each randomly flipped/rotated if ``rng``."""
    x, y = arrays.images[index], arrays.masks[index]
    if rng is not None:
        codes = rng.integers(0, 8, len(index))
        pairs = [_dihedral(xi, yi, int(c)) for xi, yi, c in zip(x, y, codes, strict=True)]
        x = np.stack([p[0] for p in pairs])
        y = np.stack([p[1] for p in pairs])
    return (torch.from_numpy(np.ascontiguousarray(x, np.float32)),
            torch.from_numpy(np.ascontiguousarray(y, np.float32)))


def _pool(arrays: SegArrays, pool: str, test_fraction: float, split_seed: int) -> np.ndarray:
    adapt, test = split_pools(len(arrays), test_fraction, split_seed)
    return adapt if pool == "adapt" else test


class TaskSampler:
    """Draws tasks from a list of datasets, each task from one dataset's pool.

    ``sample(step, index)`` is deterministic in ``(seed, step, index)``: it picks a dataset
    uniformly, then ``shots + query_size`` distinct images of its pool (the first ``shots`` are the
    support set), flipped/rotated at random when ``augment``, and with ``shift`` > 0 all of them
    under one random appearance and scale shift of that strength (:func:`shift_task`).
    """

    def __init__(
        self,
        datasets: Sequence[SegArrays],
        *,
        shots: int,
        query_size: int,
        seed: int,
        test_fraction: float,
        split_seed: int,
        augment: bool,
        pool: str = "adapt",
        shift: float = 0.0,
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not datasets:
            raise DataError("no datasets to sample tasks from")
        if shots < 1 or query_size < 1:
            raise DataError(f"shots and query_size must be >= 1, got {shots} and {query_size}")
        self.datasets = tuple(datasets)
        self.shots, self.query_size = shots, query_size
        if not 0.0 <= shift <= 1.0:
            raise DataError(f"shift strength must be in [0, 1], got {shift}")
        self.seed, self.augment, self.pool, self.shift = seed, augment, pool, shift
        self.pools = tuple(_pool(d, pool, test_fraction, split_seed) for d in self.datasets)
        for arrays, indices in zip(self.datasets, self.pools, strict=True):
            if len(indices) < shots + query_size:
                which = "adaptation" if pool == "adapt" else "test"
                raise DataError(f"{arrays.name}: asked for {shots}+{query_size} images per task "
                                f"but its {which} pool holds only {len(indices)}")

    def sample(self, step: int, index: int) -> Task:
        """Task ``index`` of meta-step ``step``."""
        rng = np.random.default_rng([self.seed, step, index])
        which = int(rng.integers(len(self.datasets)))
        arrays, pool = self.datasets[which], self.pools[which]
        chosen = rng.choice(pool, self.shots + self.query_size, replace=False)
        x, y = _gather(arrays, chosen, rng if self.augment else None)
        if self.shift:
            x, y = shift_task(x, y, rng, self.shift)
        k = self.shots
        return Task(x[:k], y[:k], x[k:], y[k:], arrays.name)

    def sample_batch(self, step: int, meta_batch_size: int) -> list[Task]:
        """The ``meta_batch_size`` tasks of meta-step ``step`` (task i is ``sample(step, i)``)."""
        return [self.sample(step, i) for i in range(meta_batch_size)]


def draw_support(
    arrays: SegArrays,
    shots: int,
    draw: int,
    *,
    seed: int,
    test_fraction: float,
    split_seed: int,
) -> tuple[Tensor, Tensor]:
    """Support set ``(shots, 3, R, R)``, ``(shots, 1, R, R)`` of evaluation draw ``draw``.

    From the adaptation pool, deterministic in ``(seed, shots, draw)``, never augmented: every
    method is scored on the same support sets.
    """
    adapt = _pool(arrays, "adapt", test_fraction, split_seed)
    if shots > len(adapt):
        raise DataError(f"asked for {shots} shots but {arrays.name}'s adaptation pool holds only "
                        f"{len(adapt)} images")
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng([seed, shots, draw])
    return _gather(arrays, rng.choice(adapt, shots, replace=False), None)


def test_pool(
    arrays: SegArrays,
    *,
    test_fraction: float,
    split_seed: int,
    size: int = 0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The test pool's images and masks: all of them (``size`` 0 or at least the pool's size), or
    a fixed seeded subset of ``size``, in dataset order."""
    test = _pool(arrays, "test", test_fraction, split_seed)
    if 0 < size < len(test):
        test = np.sort(np.random.default_rng(seed).choice(test, size, replace=False))
    return _gather(arrays, test, None)


def pooled_batch(
    datasets: Sequence[SegArrays],
    batch_size: int,
    step: int,
    seed: int,
    test_fraction: float,
    split_seed: int,
    augment: bool,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """A supervised batch ``(B, 3, R, R)``, ``(B, 1, R, R)`` from the sources' adaptation pools.

    Each image picks its dataset uniformly (as TaskSampler does for tasks, so transfer learning
    sees the datasets in the same proportions as meta-learning), then an image of its pool; with
    ``shift`` > 0 each image under its own random shift of that strength (:func:`shift_task`), the
    supervised counterpart of shifted tasks.  Deterministic in ``(seed, step)``.
    """
    if not datasets:
        raise DataError("no datasets to draw a pretraining batch from")
    pools = [_pool(d, "adapt", test_fraction, split_seed) for d in datasets]
    rng = np.random.default_rng([seed, step, _POOLED_STREAM])
    which = rng.integers(len(datasets), size=batch_size)
    xs, ys = [], []
    for d in range(len(datasets)):
        count = int(np.count_nonzero(which == d))
        if count:
            chosen = rng.choice(pools[d], count, replace=count > len(pools[d]))
            x, y = _gather(datasets[d], chosen, rng if augment else None)
            if shift:
                pairs = [shift_task(x[i : i + 1], y[i : i + 1], rng, shift) for i in range(count)]
                x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            xs.append(x)
            ys.append(y)
    order = torch.from_numpy(rng.permutation(batch_size))
    return torch.cat(xs)[order], torch.cat(ys)[order]


test_pool.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test
