"""Few-shot tasks: k support + q query pairs drawn from one dataset.

Shapes are channel-first: images ``(N, 3, R, R)`` float32, masks ``(N, 1, R, R)`` float32 in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Task:
    """One episode: adapt on the support set, score (or meta-learn) on the query set."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    dataset: str = ""
