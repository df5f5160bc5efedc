"""PANet-style prototype matching (Wang et al., "PANet: Few-Shot Image Semantic Segmentation with
Prototype Alignment", ICCV 2019), trained from scratch.

A small conv encoder maps every image to features at 1/4 resolution.  Masked average pooling of
the support features under the (area-downsampled) support mask gives one foreground and one
background prototype per shot, averaged over the shots.  Each query location is scored by its
cosine similarity to the two prototypes times a fixed temperature (PANet's 20).  The two-way
softmax over ``(s_bg, s_fg)`` equals ``sigmoid(s_fg - s_bg)``, so the foreground logit
``s_fg - s_bg`` (bilinearly upsampled to the input size) is trained with the repo's single-logit
Dice + BCE loss without changing PANet's objective.

Prototype alignment regularisation (PAR): the query's predicted (hard) mask gives query
prototypes, which must in turn segment the support images; that loss is added with weight 1.
Nothing adapts at test time, so the baseline measures what a metric-learning approach gets from
the source datasets alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imaml_seg.baselines import EpisodicBaseline, check_episode
from imaml_seg.data.tasks import Task
from imaml_seg.losses import dice_bce_loss

STRIDE = 4
"""Downsampling factor of the encoder (features at 1/4 of the input side)."""


def masked_average_pool(features: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-image prototypes ``(N, F)``: ``sum(f * m) / (sum(m) + eps)`` over the pixels.

    ``features`` is ``(N, F, h, w)``; ``mask`` is ``(N, 1, h, w)`` with weights in [0, 1] (already
    at the features' size).  ``eps`` keeps an empty mask finite (its prototype is zero).
    """
    weighted = (features * mask).sum(dim=(2, 3))
    return weighted / (mask.sum(dim=(2, 3)) + eps)


def shot_prototype(features: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """One prototype ``(F,)``: the mean over shots of :func:`masked_average_pool`.

    Shots whose mask is empty are left out of the mean (their pooled vector is an artefact of
    ``eps``, not a class sample); if every mask is empty the prototype is the zero vector, whose
    cosine similarity to anything is 0.
    """
    pooled = masked_average_pool(features, mask, eps)
    present = (mask.sum(dim=(1, 2, 3)) > 0).to(features.dtype)
    return (pooled * present[:, None]).sum(0) / present.sum().clamp_min(1.0)


def _cosine(features: Tensor, prototype: Tensor) -> Tensor:
    """Cosine similarity ``(N, 1, h, w)`` of every location to a prototype ``(F,)``.

    ``F.normalize`` divides by ``max(norm, eps)``, so a zero prototype gives 0 and finite gradients.
    """
    f = F.normalize(features, dim=1, eps=1e-8)
    p = F.normalize(prototype, dim=0, eps=1e-8)
    return torch.einsum("nchw,c->nhw", f, p).unsqueeze(1)


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.InstanceNorm2d(cout, affine=True, track_running_stats=False),
        nn.LeakyReLU(0.1),
    )


class PrototypeNet(nn.Module):
    """Encoder + prototype head; ``forward(support_x, support_y, query_x)`` -> logits.

    The encoder has 5 conv blocks (InstanceNorm, no running statistics): two stride-2 blocks reach
    1/4 resolution, two dilated ones widen the receptive field to about 57 px, and a 1x1
    projection without activation lets features (hence cosines) take either sign.
    """

    def __init__(self, width: int = 16, scale: float = 20.0) -> None:
        super().__init__()
        f = 4 * width
        self.encoder = nn.Sequential(
            _block(3, width),
            _block(width, 2 * width, stride=2),
            _block(2 * width, f, stride=2),
            _block(f, f, dilation=2),
            _block(f, f, dilation=4),
            nn.Conv2d(f, f, 1),
        )
        self.scale = scale
        self.feature_dim = f

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def score(self, features: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
        """Low-resolution foreground logits ``scale * (cos(f, fg) - cos(f, bg))``."""
        return self.scale * (_cosine(features, fg) - _cosine(features, bg))

    @staticmethod
    def prototypes(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Foreground and background prototypes from full-size ``mask`` ``(N, 1, H, W)``."""
        small = F.interpolate(mask, size=features.shape[-2:], mode="area")
        return shot_prototype(features, small), shot_prototype(features, 1.0 - small)

    def forward(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Upsampled query logits ``(Q, 1, H, W)``, plus the low-res logits and query features."""
        k = support_x.shape[0]
        feats = self.encode(torch.cat([support_x, query_x]))
        s_feat, q_feat = feats[:k], feats[k:]
        fg, bg = self.prototypes(s_feat, support_y)
        low = self.score(q_feat, fg, bg)
        up = F.interpolate(low, size=query_x.shape[-2:], mode="bilinear", align_corners=False)
        return up, low, torch.cat([s_feat, q_feat])


class PrototypeBaseline(EpisodicBaseline):
    """PANet-style baseline behind the :class:`~imaml_seg.baselines.FewShotBaseline` interface.

    The training loss of a task is ``query Dice+BCE + par_weight * support Dice+BCE`` (PAR);
    :meth:`train_step` returns the mean of that total over the meta-batch.
    """

    name = "prototype"

    def __init__(
        self,
        *,
        resolution: int,
        width: int = 16,
        lr: float = 1e-3,
        scale: float = 20.0,
        par_weight: float = 1.0,
    ) -> None:
        if resolution < 16 or resolution % STRIDE:
            raise ValueError(f"resolution must be >= 16 and a multiple of {STRIDE} ({resolution})")
        super().__init__(PrototypeNet(width=width, scale=scale), lr)
        self.resolution = resolution
        self.par_weight = par_weight

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x)
        return self.network(support_x, support_y, query_x)[0]

    def task_loss(self, task: Task) -> Tensor:
        net: PrototypeNet = self.network  # type: ignore[assignment]
        k = task.support_x.shape[0]
        up, low, feats = net(task.support_x, task.support_y, task.query_x)
        loss = dice_bce_loss(up, task.query_y)
        if self.par_weight:
            s_feat, q_feat = feats[:k], feats[k:]
            pred = (low > 0).to(low.dtype)  # hard mask, as in PANet: gradients reach q_feat only
            fg = shot_prototype(q_feat, pred)
            bg = shot_prototype(q_feat, 1.0 - pred)
            back = net.score(s_feat, fg, bg)
            back = F.interpolate(
                back, size=task.support_x.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = loss + self.par_weight * dice_bce_loss(back, task.support_y)
        return loss
