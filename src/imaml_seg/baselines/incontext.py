"""UniverSeg-style in-context segmentation (Butoi et al., "UniverSeg: Universal Medical Image
Segmentation", ICCV 2023), compact and trained from scratch.

The support set is an input: each support pair is the channel concatenation (image, mask), and the
query's features interact with every support entry through a *CrossBlock*:

    z_k = act(norm(conv([q, s_k])))        cross-convolution, one per support entry k
    q'  = ConvNormAct(mean_k z_k)          the query is updated by the mean over the support
    s_k' = ConvNormAct(z_k)                each support entry is updated too

The mean over the support axis makes the output invariant to the order of the support set and
defined for any number of shots K >= 1.  CrossBlocks are arranged as a small U-Net (three levels:
1/2, 1/4 and 1/8 of the input side, with skip connections for both the query and the support
paths); a final 1x1 conv gives the query logit.  Nothing adapts at test time.

Two economies keep it trainable on a CPU, neither of which changes the function class:

- ``conv([q, s_k])`` is linear in its input channels, so it is computed as ``conv_q(q) +
  conv_s(s_k)``: the query half once per query, not once per (query, support) pair.
- Full-resolution stems run per image (query, or support pair); the (query x support) interaction,
  whose cost scales with Q * K, starts at 1/2 resolution.  The full-resolution query stem is
  concatenated back before the head, so fine detail still reaches the output.

Normalisation is affine InstanceNorm (no running statistics); UniverSeg itself uses none, but it
steadies training from scratch on few steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imaml_seg.baselines import EpisodicBaseline, check_episode

LEVELS = 3
"""CrossBlock levels of the U-Net (after the stride-2 entry): 1/2, 1/4, 1/8 resolution."""
STRIDE = 2**LEVELS


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class ConvNormAct(nn.Sequential):
    """3x3 conv -> affine InstanceNorm -> LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.LeakyReLU(0.1)
        )


class CrossBlock(nn.Module):
    """UniverSeg's CrossBlock: a cross-convolution between the query and each support entry.

    ``forward(q, s)`` takes query features ``(Q, Cq, h, w)`` and support features
    ``(B, K, Cs, h, w)`` with ``B`` either 1 (one support set shared by all queries, as before the
    first block) or ``Q`` (support features specific to each query, as after it).  It returns the
    updated query ``(Q, C, h, w)`` and support ``(Q, K, C, h, w)`` (``None`` when
    ``update_support`` is False, for the last block, whose support output nobody reads).
    """

    def __init__(self, q_in: int, s_in: int, out: int, *, update_support: bool = True) -> None:
        super().__init__()
        # conv([q, s]) == conv_q(q) + conv_s(s): one kernel split along its input channels.
        self.cross_q = nn.Conv2d(q_in, out, 3, padding=1, bias=False)
        self.cross_s = nn.Conv2d(s_in, out, 3, padding=1, bias=False)
        self.cross_norm = _norm(out)
        self.act = nn.LeakyReLU(0.1)
        self.query = ConvNormAct(out, out)
        self.support = ConvNormAct(out, out) if update_support else None

    def forward(self, q: Tensor, s: Tensor) -> tuple[Tensor, Tensor | None]:
        nq, (nb, k) = q.shape[0], s.shape[:2]
        if nb not in (1, nq):
            raise ValueError(f"support batch {nb} must be 1 or match the {nq} queries")
        a = self.cross_q(q).unsqueeze(1)  # (Q, 1, C, h, w)
        b = self.cross_s(s.flatten(0, 1)).unflatten(0, (nb, k))  # (B, K, C, h, w)
        z = self.act(self.cross_norm((a + b).flatten(0, 1))).unflatten(0, (nq, k))
        q_new = self.query(z.mean(dim=1))
        if self.support is None:
            return q_new, None
        return q_new, self.support(z.flatten(0, 1)).unflatten(0, (nq, k))


def _pool(x: Tensor) -> Tensor:
    """2x max pooling of ``(..., C, h, w)`` with any number of leading axes."""
    lead = x.shape[:-3]
    return F.max_pool2d(x.flatten(0, len(lead) - 1), 2).unflatten(0, lead)


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of ``(..., C, h, w)`` to ``size``."""
    lead = x.shape[:-3]
    flat = F.interpolate(
        x.flatten(0, len(lead) - 1), size=size, mode="bilinear", align_corners=False
    )
    return flat.unflatten(0, lead)


class InContextNet(nn.Module):
    """Compact UniverSeg: per-image stems, CrossBlock U-Net at 1/2-1/8, query head.

    ``forward(support_x (K, 3, H, W), support_y (K, 1, H, W), query_x (Q, 3, H, W))`` returns
    foreground logits ``(Q, 1, H, W)``.  Channels: ``width`` at full and 1/2 resolution,
    ``2 * width`` at 1/4 and 1/8.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        c1, c2 = width, 2 * width
        self.query_stem = ConvNormAct(3, c1)
        self.support_stem = ConvNormAct(4, c1)
        self.enc1 = CrossBlock(c1, c1, c1)  # 1/2
        self.enc2 = CrossBlock(c1, c1, c2)  # 1/4
        self.bottom = CrossBlock(c2, c2, c2)  # 1/8
        self.dec2 = CrossBlock(2 * c2, 2 * c2, c2)  # 1/4
        self.dec1 = CrossBlock(c2 + c1, c2 + c1, c1, update_support=False)  # 1/2
        self.head = nn.Sequential(ConvNormAct(2 * c1, c1), nn.Conv2d(c1, 1, 1))

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        size = query_x.shape[-2:]
        q0 = self.query_stem(query_x)  # (Q, c1, H, W)
        s0 = self.support_stem(torch.cat([support_x, support_y], dim=1)).unsqueeze(0)
        q1, s1 = self.enc1(_pool(q0), _pool(s0))  # 1/2; s1 is (Q, K, ...) from here on
        q2, s2 = self.enc2(_pool(q1), _pool(s1))
        q3, s3 = self.bottom(_pool(q2), _pool(s2))
        h2, w2 = q2.shape[-2:]
        q, s = self.dec2(
            torch.cat([_up(q3, (h2, w2)), q2], dim=-3), torch.cat([_up(s3, (h2, w2)), s2], dim=-3)
        )
        h1, w1 = q1.shape[-2:]
        q, _ = self.dec1(
            torch.cat([_up(q, (h1, w1)), q1], dim=-3), torch.cat([_up(s, (h1, w1)), s1], dim=-3)
        )
        return self.head(torch.cat([_up(q, (size[0], size[1])), q0], dim=-3))


class InContextBaseline(EpisodicBaseline):
    """UniverSeg-style baseline behind the :class:`~imaml_seg.baselines.FewShotBaseline` interface.

    Trained on query Dice + BCE; :meth:`train_step` returns its mean over the meta-batch.
    """

    name = "incontext"

    def __init__(self, *, resolution: int, width: int = 16, lr: float = 1e-3) -> None:
        if resolution < 2 * STRIDE or resolution % STRIDE:
            raise ValueError(
                f"resolution must be >= {2 * STRIDE} and a multiple of {STRIDE} ({resolution})"
            )
        super().__init__(InContextNet(width=width), lr)
        self.resolution = resolution

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x)
        return self.network(support_x, support_y, query_x)
