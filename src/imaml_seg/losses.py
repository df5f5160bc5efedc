"""Segmentation loss: soft Dice plus binary cross-entropy on logits.

Shapes are channel-first: ``logits`` and ``target`` are ``(N, 1, H, W)``, target in {0, 1}.
The soft Dice is computed per image and averaged, with a smoothing term of 1 so that an empty
mask predicted empty costs nothing, and an empty mask predicted full costs close to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_bce_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Mean over the batch of ``(1 - soft Dice) + BCE``; a scalar."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    intersection = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return (1 - dice).mean() + bce
