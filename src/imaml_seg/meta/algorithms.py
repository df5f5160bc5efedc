"""iMAML, MAML, FOMAML, Reptile and supervised transfer behind one small interface.

``meta_gradient(algorithm, model, theta, task, config)`` returns one task's contribution to the
outer update; the trainer averages the ``ok`` ones over the meta-batch and applies the outer rule
in ``OUTER_RULE``.  Every algorithm adapts with the same ``adapt()`` used at evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value

from imaml_seg.config import RunConfig
from imaml_seg.data.tasks import Task
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.implicit import (
    OutputHVP,
    dice_bce_curvature,
    implicit_meta_grad,
    lam_meta_grad,
    output_hvp_of,
)
from imaml_seg.meta.inner import AdaptResult, SegLoss, adapt, all_finite
from imaml_seg.model import Params, forward

META_ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")

OUTER_RULE = {"imaml": "adam", "maml": "adam", "fomaml": "adam", "reptile": "sgd"}
"""Outer update per algorithm: 'adam' with ``meta_lr`` on the mean meta-gradient, or 'sgd' with
``reptile_lr`` on the mean pseudo-gradient ``theta - phi`` (``theta -= reptile_lr * mean``)."""


@dataclass
class MetaGradResult:
    """One task's meta-gradient and what happened while computing it."""

    grad: Params
    """Detached; to be averaged over the meta-batch.  Zeros when ``ok`` is False."""
    query_loss: float
    """Query loss at the adapted weights (for Reptile the query set is part of adaptation)."""
    support_loss: float
    """Support loss (without proximal term) at the adapted weights."""
    stats: dict[str, float | str] = field(default_factory=dict)
    """Diagnostics: inner_initial_loss, inner_final_loss, inner_status; for iMAML cg_residual
    (relative residual of the returned solution), cg_residual_last, cg_iterations, cg_status;
    when ``ok`` is False, reason ('inner_nonfinite', 'query_nonfinite', 'grad_nonfinite',
    'cg_nonfinite', 'cg_no_progress' or 'start_nonfinite'); start_query_loss with
    ``meta.start_weight``."""
    ok: bool = True
    """False when the task must be skipped (non-finite loss, gradient or solve, or a CG solve
    that never improved on its zero start)."""
    lam_grad: Params | None = None
    """iMAML with per-tensor strengths: the query loss's derivative in each ``log lam``
    (:func:`imaml_seg.meta.implicit.lam_meta_grad`); None otherwise."""


def bce_output_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The BCE part of ``dice_bce_loss``: convex in the logits, so its Gauss-Newton is PSD."""
    return F.binary_cross_entropy_with_logits(logits, target)


def ggn_curvature(loss_fn: SegLoss) -> Callable[[Tensor], OutputHVP]:
    """Output curvature for the Gauss-Newton product of ``loss_fn``, given the targets.

    For ``dice_bce_loss`` its exact logit Hessian with the negative parts removed (the soft
    Dice is not convex in the logits; see ``dice_bce_curvature``), so the product is PSD; for
    any other loss its exact output Hessian by autodiff (PSD if the loss is convex).
    """
    if loss_fn is dice_bce_loss:
        return dice_bce_curvature

    def curvature(target: Tensor) -> OutputHVP:
        return output_hvp_of(lambda output: loss_fn(output, target))

    return curvature


def _zeros(theta: Params) -> Params:
    return {k: torch.zeros_like(t).detach() for k, t in theta.items()}


def _failed(
    theta: Params, query: float, support: float, stats: dict, reason: str
) -> MetaGradResult:
    stats["reason"] = reason
    return MetaGradResult(_zeros(theta), query, support, stats, ok=False)


def meta_gradient(
    algorithm: str,
    model: nn.Module,
    theta: Params,
    task: Task,
    config: RunConfig,
    *,
    loss_fn: SegLoss = dice_bce_loss,
    output_curvature: Callable[[Tensor], OutputHVP] | None = None,
    lam: Params | None = None,
) -> MetaGradResult:
    """One task's meta-gradient w.r.t. ``theta`` for 'imaml', 'maml', 'fomaml' or 'reptile'.

    ``loss_fn(output, target)`` is the task loss on support and query.  With
    ``config.implicit.hessian == 'ggn'``, ``output_curvature(support_y)`` gives the output-space
    curvature of the Gauss-Newton product (default ``ggn_curvature(loss_fn)``).  Never returns
    non-finite numbers: on failure ``ok`` is False and the gradient is zeros.

    With ``config.meta.start_weight = w > 0`` the gradient of ``w L_query(theta)`` (the query
    loss of the start itself) is added, and ``stats['start_query_loss']`` records that loss.
    ``lam`` (iMAML only): one proximal strength per weight tensor instead of ``inner.lam``; the
    result then carries ``lam_grad`` too.
    """
    if lam is not None and algorithm != "imaml":
        raise ValueError("per-tensor proximal strengths (lam) are an iMAML setting")
    weight = config.meta.start_weight
    if weight != 0 and algorithm == "reptile":
        raise ValueError("meta.start_weight needs a meta-gradient; Reptile has none")
    if algorithm == "imaml":
        curvature = output_curvature or ggn_curvature(loss_fn)
        result = _imaml(model, theta, task, config, loss_fn, curvature, lam)
    elif algorithm == "maml":
        result = _maml(model, theta, task, config, loss_fn)
    elif algorithm == "fomaml":
        result = _fomaml(model, theta, task, config, loss_fn)
    elif algorithm == "reptile":
        result = _reptile(model, theta, task, config, loss_fn)
    else:
        raise ValueError(
            f"unknown meta-learning algorithm '{algorithm}' (one of {META_ALGORITHMS})"
        )
    if weight == 0 or not result.ok:
        return result
    start = {k: t.detach() for k, t in theta.items()}
    g, loss = _query_grad(model, start, task, loss_fn)
    if not (math.isfinite(loss) and all_finite(g)):
        query, support = result.query_loss, result.support_loss
        return _failed(theta, query, support, result.stats, "start_nonfinite")
    result.stats["start_query_loss"] = loss
    result.grad = {k: result.grad[k] + weight * g[k] for k in result.grad}
    return result


def _inner_stats(result: AdaptResult) -> dict[str, float | str]:
    return {
        "inner_initial_loss": result.losses[0] if result.losses else result.final_loss,
        "inner_final_loss": result.final_loss,
        "inner_status": result.status,
    }


def _query_grad(
    model: nn.Module, phi: Params, task: Task, loss_fn: SegLoss
) -> tuple[Params, float]:
    def query_loss(p: Params) -> Tensor:
        return loss_fn(forward(model, p, task.query_x), task.query_y)

    g, value = grad_and_value(query_loss)(phi)
    return {k: t.detach() for k, t in g.items()}, float(value)


def _imaml(
    model: nn.Module,
    theta: Params,
    task: Task,
    config: RunConfig,
    loss_fn: SegLoss,
    output_curvature: Callable[[Tensor], OutputHVP],
    lam: Params | None = None,
) -> MetaGradResult:
    inner = adapt(
        model,
        theta,
        task.support_x,
        task.support_y,
        config.inner,
        proximal=True,
        loss_fn=loss_fn,
        lam=lam,
    )
    stats = _inner_stats(inner)
    support = inner.final_loss
    if inner.status != "ok":
        return _failed(theta, math.nan, support, stats, "inner_nonfinite")
    phi = inner.params
    g, query = _query_grad(model, phi, task, loss_fn)
    if not (math.isfinite(query) and all_finite(g)):
        return _failed(theta, query, support, stats, "query_nonfinite")

    def support_loss(p: Params) -> Tensor:
        return loss_fn(forward(model, p, task.support_x), task.support_y)

    def support_output(p: Params) -> Tensor:
        return forward(model, p, task.support_x)

    v, solve = implicit_meta_grad(
        support_loss,
        phi,
        g,
        lam=config.inner.lam if lam is None else lam,
        config=config.implicit,
        ggn=(support_output, output_curvature(task.support_y)),
    )
    stats.update(
        cg_residual=solve.residual,
        cg_residual_last=solve.residuals[-1],
        cg_iterations=float(solve.iterations),
        cg_status=solve.status,
    )
    if solve.status == "nonfinite" or not all_finite(v):
        return _failed(theta, query, support, stats, "cg_nonfinite")
    if solve.residual >= 1.0:
        # No CG iterate beat the zero start (negative curvature or growth from the first step,
        # as with the exact Hessian at small lam): the "solution" would be a silent zero.
        return _failed(theta, query, support, stats, "cg_no_progress")
    lam_grad = None if lam is None else lam_meta_grad(v, phi, theta)
    return MetaGradResult(v, query, support, stats, lam_grad=lam_grad)


def _maml(
    model: nn.Module, theta: Params, task: Task, config: RunConfig, loss_fn: SegLoss
) -> MetaGradResult:
    leaf = {k: t.detach().requires_grad_() for k, t in theta.items()}
    inner = adapt(
        model,
        leaf,
        task.support_x,
        task.support_y,
        config.inner,
        create_graph=True,
        loss_fn=loss_fn,
    )
    stats = _inner_stats(inner)
    support = inner.final_loss
    if inner.status != "ok":
        return _failed(theta, math.nan, support, stats, "inner_nonfinite")
    query_loss = loss_fn(forward(model, inner.params, task.query_x), task.query_y)
    query = float(query_loss.detach())
    if not math.isfinite(query):
        return _failed(theta, query, support, stats, "query_nonfinite")
    names = list(leaf)
    found = torch.autograd.grad(query_loss, [leaf[k] for k in names], allow_unused=True)
    grad = {
        k: (torch.zeros_like(leaf[k]) if g is None else g).detach()
        for k, g in zip(names, found, strict=True)
    }
    if not all_finite(grad):
        return _failed(theta, query, support, stats, "grad_nonfinite")
    return MetaGradResult(grad, query, support, stats)


def _fomaml(
    model: nn.Module, theta: Params, task: Task, config: RunConfig, loss_fn: SegLoss
) -> MetaGradResult:
    inner = adapt(model, theta, task.support_x, task.support_y, config.inner, loss_fn=loss_fn)
    stats = _inner_stats(inner)
    support = inner.final_loss
    if inner.status != "ok":
        return _failed(theta, math.nan, support, stats, "inner_nonfinite")
    g, query = _query_grad(model, inner.params, task, loss_fn)
    if not (math.isfinite(query) and all_finite(g)):
        return _failed(theta, query, support, stats, "query_nonfinite")
    return MetaGradResult(g, query, support, stats)


def _reptile(
    model: nn.Module, theta: Params, task: Task, config: RunConfig, loss_fn: SegLoss
) -> MetaGradResult:
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    inner = adapt(model, theta, x, y, config.inner, loss_fn=loss_fn)
    stats = _inner_stats(inner)
    if inner.status != "ok":
        return _failed(theta, math.nan, inner.final_loss, stats, "inner_nonfinite")
    phi = inner.params
    with torch.no_grad():
        out = forward(model, phi, x)
        n = task.support_x.shape[0]
        support = float(loss_fn(out[:n], task.support_y))
        query = float(loss_fn(out[n:], task.query_y))
    grad = {k: (theta[k].detach() - phi[k]) for k in theta}
    if not (all_finite(grad) and math.isfinite(query) and math.isfinite(support)):
        return _failed(theta, query, support, stats, "query_nonfinite")
    return MetaGradResult(grad, query, support, stats)


def supervised_grad(
    model: nn.Module,
    theta: Params,
    images: Tensor,
    masks: Tensor,
    *,
    loss_fn: SegLoss = dice_bce_loss,
) -> tuple[Params, float]:
    """Gradient and value of the loss on a batch, for transfer (supervised) pretraining."""

    def loss(p: Params) -> Tensor:
        return loss_fn(forward(model, p, images), masks)

    g, value = grad_and_value(loss)({k: t.detach() for k, t in theta.items()})
    return {k: t.detach() for k, t in g.items()}, float(value)
