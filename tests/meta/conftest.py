"""Tiny networks and synthetic blob tasks for the meta-learning core's tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from imaml_seg.data.tasks import Task


def make_blobs(
    n: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``n`` RGB images ``(n, 3, size, size)`` with one noisy disc each, and its mask."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=dtype)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    images, masks = [], []
    for _ in range(n):
        centre = torch.rand(2, generator=g, dtype=dtype) * size * 0.6 + size * 0.2
        radius = (torch.rand(1, generator=g, dtype=dtype) * 0.2 + 0.15) * size
        mask = (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2).to(dtype)
        fg = torch.rand(3, 1, 1, generator=g, dtype=dtype)
        bg = torch.rand(3, 1, 1, generator=g, dtype=dtype)
        noise = 0.1 * torch.randn(3, size, size, generator=g, dtype=dtype)
        images.append(mask * fg + (1 - mask) * bg + noise)
        masks.append(mask[None])
    return torch.stack(images), torch.stack(masks)


def make_task(shots: int, query: int, size: int, seed: int = 0, dtype=torch.float32) -> Task:
    x, y = make_blobs(shots + query, size, seed, dtype)
    return Task(x[:shots], y[:shots], x[shots:], y[shots:], dataset="blobs")


def make_tiny_net(seed: int = 0) -> nn.Module:
    """A smooth (tanh) two-layer conv net, float64: exact enough for Hessians and differences."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1)
    ).double()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a busy shared machine makes OpenMP's
    multi-thread barriers spin (tens of times slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def blobs() -> Callable[..., tuple[Tensor, Tensor]]:
    return make_blobs


@pytest.fixture
def blob_task() -> Callable[..., Task]:
    return make_task


@pytest.fixture
def tiny_net() -> Callable[..., nn.Module]:
    return make_tiny_net
