"""Segmentation metrics as pure functions on binary masks.

Inputs are channel-first ``(N, 1, H, W)`` tensors; anything > 0.5 counts as foreground (pass
probabilities thresholded by the caller, or masks).  Each function returns a float64 tensor
``(N,)``, one score per image.

Empty-mask policy (stated once, applied everywhere):
  * Dice, IoU, precision, recall: when the prediction and the ground truth are both empty the
    image scores 1.0 (nothing to find, nothing claimed); when only one of them is empty the
    overlap is zero and so is the score (precision with an empty prediction and a non-empty
    truth is 0, recall with an empty truth and a non-empty prediction is 0).
  * HD95: both empty scores 0.0; exactly one empty scores the image diagonal ``sqrt(H^2 + W^2)``,
    the worst possible distance, so failures are never dropped from means.
"""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import compute_hausdorff_distance
from torch import Tensor


def _binary(x: Tensor, name: str) -> Tensor:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (N, 1, H, W), got {tuple(x.shape)}")
    return (x > 0.5).reshape(x.shape[0], -1).double()


def _counts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p, t = _binary(pred, "pred"), _binary(target, "target")
    tp = (p * t).sum(1)
    return tp, p.sum(1), t.sum(1)


def _ratio(num: Tensor, den: Tensor, both_empty: Tensor) -> Tensor:
    out = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
    return torch.where(both_empty, torch.ones_like(out), out)


def dice(pred: Tensor, target: Tensor) -> Tensor:
    """Dice ``2|P∩T| / (|P| + |T|)`` per image, ``(N,)``."""
    tp, np_, nt = _counts(pred, target)
    return _ratio(2 * tp, np_ + nt, (np_ == 0) & (nt == 0))


def iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union (Jaccard) per image, ``(N,)``."""
    tp, np_, nt = _counts(pred, target)
    return _ratio(tp, np_ + nt - tp, (np_ == 0) & (nt == 0))


def precision(pred: Tensor, target: Tensor) -> Tensor:
    """``|P∩T| / |P|`` per image, ``(N,)``."""
    tp, np_, nt = _counts(pred, target)
    return _ratio(tp, np_, (np_ == 0) & (nt == 0))


def recall(pred: Tensor, target: Tensor) -> Tensor:
    """``|P∩T| / |T|`` per image (sensitivity), ``(N,)``."""
    tp, np_, nt = _counts(pred, target)
    return _ratio(tp, nt, (np_ == 0) & (nt == 0))


def hd95(pred: Tensor, target: Tensor) -> Tensor:
    """95th-percentile symmetric Hausdorff distance in pixels per image, ``(N,)`` (MONAI)."""
    _, np_, nt = _counts(pred, target)
    h, w = pred.shape[-2:]
    out = torch.zeros(pred.shape[0], dtype=torch.float64)
    out[(np_ == 0) ^ (nt == 0)] = math.hypot(h, w)
    both = (np_ > 0) & (nt > 0)
    if both.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_hausdorff_distance(
                (pred[both] > 0.5).float(),
                (target[both] > 0.5).float(),
                include_background=True,
                percentile=95,
            )
        out[both] = d.reshape(-1).double().cpu()
    return out


def all_metrics(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Every metric above, keyed by name, each ``(N,)``."""
    return {
        "dice": dice(pred, target),
        "iou": iou(pred, target),
        "precision": precision(pred, target),
        "recall": recall(pred, target),
        "hd95": hd95(pred, target),
    }
