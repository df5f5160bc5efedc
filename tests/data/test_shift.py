"""Synthetic domain shift per task: one shift for all images of a task, masks kept aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imaml_seg.data.cache import SegArrays
from imaml_seg.data.shift import _zoom, shift_task, standardise
from imaml_seg.data.tasks import TaskSampler, pooled_batch
from imaml_seg.data.validate import DataError

SPLIT = {"test_fraction": 0.5, "split_seed": 3}


def blobs(n: int, r: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random rectangles as masks; every image channel is the standardised mask."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, 1, r, r)
    for i in range(n):
        top, left = rng.integers(0, r // 2, 2)
        h, w = rng.integers(3, r // 2, 2)
        masks[i, 0, top : top + h, left : left + w] = 1
    return standardise(masks.repeat(1, 3, 1, 1)), masks


def test_strength_zero_is_the_identity_and_draws_nothing() -> None:
    x, y = blobs(3)
    rng = np.random.default_rng(0)
    x2, y2 = shift_task(x, y, rng, 0.0)
    assert x2 is x and y2 is y
    assert rng.random() == np.random.default_rng(0).random()


def test_keyed_by_the_generator() -> None:
    x, y = blobs(4)
    a = shift_task(x, y, np.random.default_rng([1, 2]), 1.0)
    b = shift_task(x, y, np.random.default_rng([1, 2]), 1.0)
    c = shift_task(x, y, np.random.default_rng([1, 3]), 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_shapes_binary_masks_and_standardised_channels() -> None:
    x, y = blobs(5, seed=1)
    for key in range(10):
        sx, sy = shift_task(x, y, np.random.default_rng(key), 1.0)
        assert sx.shape == x.shape and sy.shape == y.shape and sx.dtype == x.dtype
        assert set(sy.unique().tolist()) <= {0.0, 1.0}
        live = sx.std(dim=(-2, -1)) > 0.5  # a crop inside one region is constant: left at 0
        assert torch.allclose(sx.mean(dim=(-2, -1)), torch.zeros(5, 3), atol=1e-5)
        assert torch.allclose(sx.std(dim=(-2, -1), unbiased=False)[live], torch.ones(1), atol=1e-4)


def test_zoom_crops_image_and_mask_alike() -> None:
    _, y = blobs(6, seed=2)
    x = y.repeat(1, 3, 1, 1)  # the mask itself in 0/1, resized the same way as an image
    zx, zy = _zoom(x, y, 10, np.random.default_rng(0))
    assert zx.shape == x.shape and zy.shape == y.shape
    assert torch.equal((zx[:, :1] > 0.5).float(), zy)
    assert not torch.equal(zy, y)


def test_image_and_mask_stay_aligned() -> None:
    """Each channel of a two-valued image stays two-valued under mixing and the curve (up to the
    bilinear edge of a zoom), and the crop is the same for image and mask: every non-constant
    channel correlates with the mask at +-0.75 or more (a crop catching a sliver is mostly edge)."""
    x, y = blobs(6, r=48, seed=2)
    cropped = 0
    for key in range(20):
        sx, sy = shift_task(x, y, np.random.default_rng(key), 1.0)
        cropped += int(not torch.equal(sy, y))
        target = standardise(sy)
        for i in range(6):
            if sy[i].min() == sy[i].max():
                continue
            for c in range(3):
                corr = float((sx[i, c] * target[i, 0]).mean())
                assert abs(corr) > 0.75 or sx[i, c].abs().max() == 0
    assert cropped > 0


def test_one_colour_shift_for_the_whole_task() -> None:
    """Images of one task share the colour transform: the same image twice in a task comes out
    the same whenever the zoom rounds back to the full image; across tasks its colour differs."""
    rng = np.random.default_rng(0)
    x = standardise(torch.from_numpy(rng.normal(size=(1, 3, 16, 16)).astype(np.float32)))
    y = torch.zeros(1, 1, 16, 16)
    pair_x, pair_y = x.repeat(2, 1, 1, 1), y.repeat(2, 1, 1, 1)
    unzoomed = 0
    for key in range(40):
        zoom = np.exp(np.random.default_rng(key).uniform(0.0, np.log1p(0.05)))
        sx, _ = shift_task(pair_x, pair_y, np.random.default_rng(key), 0.05)
        if round(16 / zoom) == 16:  # the zoom is the generator's first draw
            unzoomed += 1
            assert torch.allclose(sx[0], sx[1], atol=1e-5)
    assert unzoomed > 0
    a, _ = shift_task(pair_x, pair_y, np.random.default_rng(1), 1.0)
    b, _ = shift_task(pair_x, pair_y, np.random.default_rng(2), 1.0)
    assert not torch.allclose(a, b)


def test_out_of_range_strength() -> None:
    x, y = blobs(1)
    with pytest.raises(ValueError, match=r"shift strength must be in \[0, 1\], got 1.5"):
        shift_task(x, y, np.random.default_rng(0), 1.5)


def test_sampler_and_pooled_batch_shift_keyed() -> None:
    x, y = blobs(30, seed=3)
    data = SegArrays(x.numpy(), y.numpy(), tuple(f"b{i}" for i in range(30)), "blobs")
    common = dict(shots=2, query_size=3, seed=0, augment=False, **SPLIT)
    plain = TaskSampler([data], **common).sample(4, 1)
    shifted = TaskSampler([data], shift=1.0, **common)
    task = shifted.sample(4, 1)
    assert torch.equal(task.support_x, shifted.sample(4, 1).support_x)
    assert not torch.equal(task.support_x, plain.support_x)
    with pytest.raises(DataError, match=r"shift strength must be in \[0, 1\], got -0.1"):
        TaskSampler([data], shift=-0.1, **common)
    bx, by = pooled_batch([data], 8, 2, seed=0, augment=False, shift=1.0, **SPLIT)
    bx2, _ = pooled_batch([data], 8, 2, seed=0, augment=False, shift=1.0, **SPLIT)
    assert bx.shape == (8, 3, 16, 16) and torch.equal(bx, bx2)
    assert not torch.equal(bx, pooled_batch([data], 8, 2, seed=0, augment=False, **SPLIT)[0])
    assert set(by.unique().tolist()) <= {0.0, 1.0}
