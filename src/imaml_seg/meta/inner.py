"""``adapt()``: the one inner loop, shared by meta-training (every algorithm) and evaluation.

A pure function of ``(theta, support set, InnerConfig)``: SGD or Adam on the weight dict through
``functional_call``, optionally with iMAML's proximal term ``lam/2 ||phi - theta||^2``.  Without
``create_graph`` every step is detached, so memory stays flat in the number of steps; with it the
steps stay differentiable in ``theta`` (second-order MAML).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from imaml_seg.config import InnerConfig
from imaml_seg.data.tasks import DIHEDRAL, dihedral
from imaml_seg.losses import dice_bce_loss
from imaml_seg.model import Params, forward

SegLoss = Callable[[Tensor, Tensor], Tensor]
"""(logits, target) -> scalar loss."""

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class AdaptResult:
    """Adapted weights and the support loss along the way."""

    params: Params
    """Adapted weights phi (detached unless ``create_graph``); always finite."""
    losses: list[float]
    """Support loss (without the proximal term) at each step, before its update (on that step's
    transformed pairs when augmenting)."""
    final_loss: float = math.nan
    """Support loss (without the proximal term) at the returned ``params``."""
    status: str = "ok"
    """'ok', or 'nonfinite' if a loss or gradient became NaN/Inf (then the last finite weights
    are returned and the loop stopped early)."""


def all_finite(tensors: Params) -> bool:
    """True if no entry of any tensor is NaN or infinite (one device sync).

    Checks the sum of the tensors' norms (one fused pass): it is NaN or Inf when an entry is, and
    also when a norm overflows the dtype's range, which counts as non-finite here too.
    """
    if not tensors:
        return True
    with torch.no_grad():
        norms = torch._foreach_norm([t.detach() for t in tensors.values()])
        return bool(torch.isfinite(torch.stack(norms).sum()))


class _Step:
    """One functional SGD or Adam update on a weight dict (state held per adapt() call)."""

    def __init__(self, config: InnerConfig, params: Params) -> None:
        if config.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown inner optimizer '{config.optimizer}' (use 'sgd' or 'adam')")
        self.lr = config.inner_lr
        self.adam = config.optimizer == "adam"
        self.t = 0
        if self.adam:
            self.m = {k: torch.zeros_like(p) for k, p in params.items()}
            self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    def __call__(self, params: Params, grads: Params) -> Params:
        if not self.adam:
            keys = list(params)
            moved = torch._foreach_add(
                [params[k] for k in keys], [grads[k] for k in keys], alpha=-self.lr
            )
            return dict(zip(keys, moved, strict=True))
        b1, b2 = ADAM_BETAS
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        out: Params = {}
        for k, p in params.items():
            g = grads[k]
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            # Clamped before the square root so that differentiating through the step
            # (create_graph) at a zero gradient gives 0, not inf * 0 = NaN; the value is
            # unchanged up to 1e-15, far below eps.  Not sqrt(v + eps^2): Adam's first step is
            # g / (|g| + eps), whose derivative in g comes from eps alone, so the form matters.
            denom = (self.v[k] / c2).clamp_min(1e-30).sqrt() + ADAM_EPS
            out[k] = p - self.lr * (self.m[k] / c1) / denom
        return out


def adapt(
    model: nn.Module,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    config: InnerConfig,
    *,
    proximal: bool = False,
    create_graph: bool = False,
    steps: int | None = None,
    loss_fn: SegLoss = dice_bce_loss,
    augment: bool = False,
    observe: Callable[[int, Params], None] | None = None,
    lam: Params | None = None,
) -> AdaptResult:
    """Fine-tune ``theta`` on the support set: ``steps`` (default ``config.inner_steps``) updates.

    Minimises ``loss_fn(forward(model, phi, support_x), support_y)``, plus
    ``config.lam/2 ||phi - theta||^2`` if ``proximal`` (theta detached there: iMAML's phi depends
    on theta only through the implicit gradient); ``lam``, one scalar per weight tensor, replaces
    ``config.lam`` there with per-tensor strengths (``lam[k]/2 ||phi_k - theta_k||^2``).
    ``model`` may be any module whose forward maps ``support_x`` to what ``loss_fn`` compares
    with ``support_y``.  With ``create_graph`` the
    result is differentiable w.r.t. ``theta`` (whose tensors must then require grad).  With
    ``augment``, step ``t`` sees support pair ``i`` under dihedral transform ``(t + i) % 8``
    (a flip and/or quarter turn of image and mask alike), so k shots act as up to 8k; the
    recorded ``losses`` are then those of the transformed pairs each step saw.  ``observe(t,
    phi)`` sees the weights after ``t`` updates, for every ``t`` from 0 to the last one made
    (a loop stopped early by a non-finite loss is not observed past its last finite weights).
    """
    n_steps = config.inner_steps if steps is None else steps
    anchor = {k: t.detach() for k, t in theta.items()}
    if lam is not None and set(lam) != set(theta):
        raise ValueError("per-tensor lam needs one strength for every weight tensor of theta")
    strength = {k: t.detach().to(anchor[k]) for k, t in (lam or {}).items()}

    def task_loss(p: Params, x: Tensor = support_x, y: Tensor = support_y) -> Tensor:
        return loss_fn(forward(model, p, x), y)

    def views(t: int) -> tuple[Tensor, Tensor]:
        if not augment:
            return support_x, support_y
        codes = [(t + i) % len(DIHEDRAL) for i in range(len(support_x))]
        x = torch.stack([dihedral(xi, c) for xi, c in zip(support_x, codes, strict=True)])
        y = torch.stack([dihedral(yi, c) for yi, c in zip(support_y, codes, strict=True)])
        return x, y

    def objective(p: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = task_loss(p, x, y)
        total = loss
        if proximal and lam is None:
            prox = sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
            total = loss + 0.5 * config.lam * prox
        elif proximal:
            prox = sum(strength[k] * ((p[k] - anchor[k]) ** 2).sum() for k in p)
            total = loss + 0.5 * prox
        return total, loss.detach()

    if create_graph:
        if not any(t.requires_grad for t in theta.values()):
            raise ValueError("create_graph=True needs theta tensors that require grad")
        phi = dict(theta)
    else:
        phi = anchor
    step = _Step(config, phi)
    losses: list[float] = []
    previous: Params | None = None  # the weights before the last update (their loss was finite)
    for t in range(n_steps):
        x, y = views(t)
        if create_graph:
            total, loss = objective(phi, x, y)
            grads = _grads_with_graph(total, phi)
        else:
            grads, total = grad_and_value(task_loss)(phi, x, y)
            if proximal:
                grads = _add_proximal(grads, phi, anchor, strength or config.lam)
            loss = total = total.detach()
        losses.append(float(loss))
        if not math.isfinite(float(total.detach())):
            if previous is None:
                return AdaptResult(phi, losses, math.nan, "nonfinite")
            return AdaptResult(previous, losses, losses[-2], "nonfinite")
        if observe is not None:
            observe(t, phi)
        if not all_finite(grads):
            return AdaptResult(phi, losses, losses[-1], "nonfinite")
        previous, phi = phi, step(phi, grads)
        if not create_graph:
            phi = {k: t.detach() for k, t in phi.items()}

    with torch.no_grad():
        final = float(task_loss(phi))
    if not math.isfinite(final) and previous is not None:
        return AdaptResult(previous, losses, losses[-1], "nonfinite")
    if observe is not None:
        observe(n_steps, phi)
    return AdaptResult(phi, losses, final, "ok" if math.isfinite(final) else "nonfinite")


def _add_proximal(
    grads: Params, phi: Params, anchor: Params, lam: float | dict[str, float | Tensor]
) -> Params:
    """``grads + lam (phi - anchor)``: the proximal term's gradient, in closed form (``lam``
    one strength, or one per weight tensor)."""
    keys = list(grads)
    diff = torch._foreach_sub([phi[k] for k in keys], [anchor[k] for k in keys])
    if isinstance(lam, dict):
        return {k: grads[k] + lam[k] * d for k, d in zip(keys, diff, strict=True)}
    total = torch._foreach_add([grads[k] for k in keys], diff, alpha=lam)
    return dict(zip(keys, total, strict=True))


def _grads_with_graph(total: Tensor, params: Params) -> Params:
    """d total / d params, differentiable (create_graph); zeros where params do not enter."""
    names = [k for k, t in params.items() if t.requires_grad]
    if not math.isfinite(float(total.detach())) or not names:
        return {k: torch.zeros_like(t) for k, t in params.items()}
    found = torch.autograd.grad(
        total, [params[k] for k in names], create_graph=True, allow_unused=True
    )
    grads = {k: torch.zeros_like(t) for k, t in params.items()}
    grads.update({k: g for k, g in zip(names, found, strict=True) if g is not None})
    return grads
