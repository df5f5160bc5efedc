"""Few-shot segmentation baselines that need no test-time adaptation.

Two families the literature compares gradient-based meta-learning against:

- ``prototype``: PANet-style prototype matching (Wang et al., "PANet: Few-Shot Image Semantic
  Segmentation with Prototype Alignment", ICCV 2019).
- ``incontext``: UniverSeg-style in-context segmentation (Butoi et al., "UniverSeg: Universal
  Medical Image Segmentation", ICCV 2023).

Both train from scratch, episodically, on the source datasets' tasks (no pretrained weights), and
both read the support set as an input at test time instead of adapting weights to it.  They share
one small interface, :class:`FewShotBaseline`, so the experiment runner treats them alike; build
them with :func:`build_baseline`.  Shapes are channel-first: ``support_x (K, 3, H, W)``,
``support_y (K, 1, H, W)`` in {0, 1}, ``query_x (Q, 3, H, W)``; predictions are foreground logits
``(Q, 1, H, W)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from imaml_seg.data.tasks import Task
from imaml_seg.losses import dice_bce_loss

BASELINES = ("prototype", "incontext")


@runtime_checkable
class FewShotBaseline(Protocol):
    """What the experiment runner needs from a few-shot baseline."""

    name: str

    def train_step(self, tasks: list[Task]) -> float:
        """One episodic optimisation step (Adam) on a meta-batch; returns the mean loss."""
        ...

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Foreground logits ``(Q, 1, H, W)`` for ``query_x``; no gradient, no adaptation."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """The network's weights (detached copies), safetensors-friendly."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`state_dict`."""
        ...


def check_episode(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> None:
    """Raise ValueError unless the shapes form one episode (K >= 1 supports, Q >= 1 queries)."""
    if support_x.dim() != 4 or support_y.dim() != 4 or query_x.dim() != 4:
        raise ValueError(
            "expected support_x (K, C, H, W), support_y (K, 1, H, W), query_x (Q, C, H, W); got "
            f"{tuple(support_x.shape)}, {tuple(support_y.shape)}, {tuple(query_x.shape)}"
        )
    k, c, h, w = support_x.shape
    if k < 1 or query_x.shape[0] < 1:
        raise ValueError("an episode needs at least one support and one query image")
    if tuple(support_y.shape) != (k, 1, h, w):
        raise ValueError(
            f"support_y {tuple(support_y.shape)} does not match support_x {(k, c, h, w)}"
        )
    if tuple(query_x.shape[1:]) != (c, h, w):
        raise ValueError(f"query_x {tuple(query_x.shape)} does not match support_x {(k, c, h, w)}")


class EpisodicBaseline:
    """Shared training loop: a network read as ``logits(support, query)``, outer Adam on episodes.

    Subclasses set ``name`` and implement :meth:`logits` (differentiable) and may override
    :meth:`task_loss` (e.g. to add a regulariser).  The loss of a meta-batch is the mean of the
    task losses; gradients are accumulated task by task so memory holds one task's graph at a time.
    """

    name: str = ""

    def __init__(self, network: nn.Module, lr: float) -> None:
        self.network = network
        self.optimizer = torch.optim.Adam(network.parameters(), lr=lr)

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Differentiable foreground logits ``(Q, 1, H, W)``."""
        raise NotImplementedError

    def task_loss(self, task: Task) -> Tensor:
        """Dice + BCE of the query prediction (a scalar with a graph)."""
        return dice_bce_loss(
            self.logits(task.support_x, task.support_y, task.query_x), task.query_y
        )

    def train_step(self, tasks: list[Task]) -> float:
        if not tasks:
            raise ValueError("train_step needs at least one task")
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for task in tasks:
            loss = self.task_loss(task) / len(tasks)
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        return total

    @torch.no_grad()
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        self.network.eval()
        return self.logits(support_x, support_y, query_x)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.network.load_state_dict(state, strict=True)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


def build_baseline(
    name: str, *, resolution: int, width: int = 16, lr: float = 1e-3, seed: int = 0
) -> FewShotBaseline:
    """A freshly initialised baseline, ``'prototype'`` or ``'incontext'``.

    ``resolution`` is checked against the network's downsampling; ``width`` is the base channel
    count; ``lr`` the outer Adam step; ``seed`` fixes the initial weights (the global RNG is left
    as it was).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline '{name}' (known: {', '.join(BASELINES)})")
    if width < 1 or lr <= 0:
        raise ValueError(f"width must be >= 1 and lr > 0 (got width={width}, lr={lr})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "prototype":
            from imaml_seg.baselines.prototype import PrototypeBaseline

            return PrototypeBaseline(resolution=resolution, width=width, lr=lr)
        from imaml_seg.baselines.incontext import InContextBaseline

        return InContextBaseline(resolution=resolution, width=width, lr=lr)
