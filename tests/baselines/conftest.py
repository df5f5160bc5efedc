"""Shared helpers for the baseline tests: a synthetic few-shot task family and a hard Dice."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from imaml_seg.baselines import FewShotBaseline, build_baseline
from imaml_seg.data.tasks import Task
from imaml_seg.losses import dice_bce_loss


def disk_images(n: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy images ``(n, 3, size, size)`` each with one brighter disk, and its masks.

    Disk radius 3..size/4 px at a random position; background ~0.3, disk ~0.7, Gaussian noise
    (standard deviation 0.15 per pixel and channel): single pixels are ambiguous, regions are not.
    """
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = 3 + torch.rand(n, generator=generator) * (size / 4 - 3)
    cy = radius + torch.rand(n, generator=generator) * (size - 2 * radius)
    cx = radius + torch.rand(n, generator=generator) * (size - 2 * radius)
    dist2 = (ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2
    masks = (dist2 <= radius[:, None, None] ** 2).float().unsqueeze(1)
    noise = 0.15 * torch.randn(n, 3, size, size, generator=generator)
    images = 0.3 + 0.4 * masks + noise
    return images, masks


def make_disk_task(generator: torch.Generator, shots: int, queries: int, size: int = 32) -> Task:
    x, y = disk_images(shots + queries, size, generator)
    return Task(x[:shots], y[:shots], x[shots:], y[shots:], dataset="disks")


def hard_dice(logits: Tensor, target: Tensor) -> float:
    """Mean over images of the Dice of ``logits > 0`` against ``target`` (1 when both empty)."""
    pred = (logits > 0).float()
    inter = (pred * target).sum(dim=(1, 2, 3))
    total = pred.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))
    return float(dice.mean())


@pytest.fixture
def disk_task() -> Callable[..., Task]:
    """``disk_task(seed, shots, queries, size=32)`` -> one seeded synthetic Task."""

    def make(seed: int, shots: int, queries: int, size: int = 32) -> Task:
        return make_disk_task(torch.Generator().manual_seed(seed), shots, queries, size)

    return make


def _train_and_score(
    name: str, *, steps: int, shots: int = 3, meta_batch: int = 2, seed: int = 0
) -> dict[str, float]:
    """Query Dice and loss on 8 fixed held-out disk tasks before and after ``steps`` train steps."""
    held_out = [make_disk_task(torch.Generator().manual_seed(1000 + i), 5, 4) for i in range(8)]

    def score(baseline: FewShotBaseline) -> tuple[float, float]:
        dices, losses = [], []
        for t in held_out:
            logits = baseline.predict(t.support_x, t.support_y, t.query_x)
            dices.append(hard_dice(logits, t.query_y))
            losses.append(float(dice_bce_loss(logits, t.query_y)))
        return sum(dices) / len(dices), sum(losses) / len(losses)

    baseline = build_baseline(name, resolution=32, seed=seed)
    dice0, loss0 = score(baseline)
    generator = torch.Generator().manual_seed(seed)
    train_losses = []
    for _ in range(steps):
        tasks = [make_disk_task(generator, shots, 4) for _ in range(meta_batch)]
        train_losses.append(baseline.train_step(tasks))
    dice1, loss1 = score(baseline)
    return {
        "dice_before": dice0,
        "dice_after": dice1,
        "loss_before": loss0,
        "loss_after": loss1,
        "train_first": sum(train_losses[:5]) / 5,
        "train_last": sum(train_losses[-5:]) / 5,
    }


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run these tiny (32 px) workloads on one intra-op thread, restoring the setting afterwards.

    On a shared 2-core machine, two OpenMP threads competing with other processes can stall on
    barriers (a train step measured 75x slower under load); one thread keeps the tests' time stable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def train_and_score() -> Callable[..., dict[str, float]]:
    """``train_and_score(name, steps=..., shots=3, meta_batch=2, seed=0)``: query Dice and loss on
    8 fixed held-out disk tasks before and after training, and the first/last train losses."""
    return _train_and_score
