"""Synthetic domain shift: one random appearance and scale per task, for meta-training.

Meta-training tasks come from the source datasets, which a warm start (transfer pretraining) has
already learned: adapting to them needs almost nothing, so the meta-learner learns to hold the
network still (session 33's learned proximal strengths all rose), while an unseen target needs the
opposite.  Shifting each task to a new random "device" makes adaptation necessary during
meta-training too: every image of a task gets the same colour mixing, channel curve and zoom, so
the support set shows the shift that the query set is scored under.

Images are channel-first ``(N, 3, R, R)`` float32 standardised per image and channel (as
:func:`imaml_seg.data.cache.normalise` leaves them), masks ``(N, 1, R, R)`` float32 in {0, 1}.
Gains and offsets per channel would vanish under that standardisation, so the shift mixes
channels, bends each channel's curve and zooms in, then standardises again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_FLAT = 1e-4


def standardise(x: Tensor) -> Tensor:
    """Zero mean, unit standard deviation per image and channel of ``(N, C, R, R)``; a channel
    with (almost) no spread, such as a crop inside one region, becomes all zeros."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return torch.where(std > _FLAT, (x - mean) / std.clamp_min(_FLAT), torch.zeros_like(x))


def _zoom(x: Tensor, y: Tensor, side: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Crop a random ``side x side`` window of each pair (its own offset) and resize it back."""
    r = x.shape[-1]
    if side >= r:
        return x, y
    xs, ys = [], []
    for xi, yi in zip(x, y, strict=True):
        top, left = (int(v) for v in rng.integers(0, r - side + 1, 2))
        window = (slice(None), slice(top, top + side), slice(left, left + side))
        xs.append(xi[window])
        ys.append(yi[window])
    size = (r, r)
    x = F.interpolate(torch.stack(xs), size=size, mode="bilinear", align_corners=False)
    y = F.interpolate(torch.stack(ys), size=size, mode="bilinear", align_corners=False)
    return x, (y > 0.5).to(y.dtype)


def shift_task(
    x: Tensor, y: Tensor, rng: np.random.Generator, strength: float
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, R, R)`` and masks ``(N, 1, R, R)`` under one random shift of ``strength``.

    ``strength`` in [0, 1] scales every part (0 returns the input unchanged, drawing nothing):

    - zoom: a crop of side ``R / z`` resized to ``R``, ``z`` log-uniform in ``[1, 1 + strength]``,
      the same ``z`` for all pairs, each at its own random place (masks resized bilinearly and
      thresholded at 0.5);
    - colour: ``M x`` per pixel with ``M = I + strength * G``, ``G`` Gaussian (sd 0.5); with
      probability ``strength / 2`` the output channels are permuted, and each is negated with
      probability ``strength / 4`` (an inverted channel);
    - curve: ``sign(v) |v| ** g`` per channel, ``log g`` uniform in ``±strength / 2``;

    then each image is standardised per channel again.  All of it is drawn from ``rng``, so a
    task keyed by ``(seed, step, index)`` gets the same shift wherever it is drawn.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"shift strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return x, y
    r = x.shape[-1]
    zoom = math.exp(rng.uniform(0.0, math.log1p(strength)))
    mix = np.eye(3) + strength * rng.normal(0.0, 0.5, (3, 3))
    if rng.random() < strength / 2:
        mix = mix[rng.permutation(3)]
    mix[rng.random(3) < strength / 4] *= -1.0
    gamma = np.exp(strength * rng.uniform(-0.5, 0.5, 3))

    x, y = _zoom(x, y, max(int(round(r / zoom)), 1), rng)
    x = torch.einsum("ij,njhw->nihw", torch.as_tensor(mix, dtype=x.dtype), x)
    g = torch.as_tensor(gamma, dtype=x.dtype).view(1, 3, 1, 1)
    x = torch.sign(x) * x.abs().pow(g)
    return standardise(x), y
