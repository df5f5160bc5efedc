"""Curvature products and iMAML's implicit meta-gradient (Rajeswaran et al. 2019, eq. 7).

At the adapted weights ``phi* = argmin L_support(phi) + lam/2 ||phi - theta||^2`` the
meta-gradient of a query loss is ``(I + H/lam)^{-1} g`` with ``H`` the Hessian of ``L_support``
(without the proximal term) at ``phi*`` and ``g`` the query gradient at ``phi*``.  It is solved
with a few CG steps on Hessian-vector products (or Gauss-Newton products, positive semi-definite
when the loss is convex in the network output), never forming ``H``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from imaml_seg.config import ImplicitConfig
from imaml_seg.meta.linalg import CGResult, Solver, cg
from imaml_seg.model import Params, flatten, unflatten

LossFn = Callable[[Params], Tensor]
"""Weights -> scalar loss."""
OutputFn = Callable[[Params], Tensor]
"""Weights -> network output (logits)."""
OutputLoss = Callable[[Tensor], Tensor]
"""Network output -> scalar loss (targets closed over)."""
OutputHVP = Callable[[Tensor, Tensor], Tensor]
"""``(output, u) -> H_out u``: a curvature product in output space (targets closed over)."""


def _detached(params: Params) -> Params:
    return {name: t.detach() for name, t in params.items()}


def hvp(loss_fn: LossFn, params: Params, v: Params) -> Params:
    """Hessian-vector product ``H v`` of ``loss_fn`` at ``params``, forward-over-reverse.

    ``jvp`` of ``grad``: one forward-mode pass through the backward pass, no graph kept.
    """
    _, out = jvp(grad(loss_fn), (_detached(params),), (_detached(v),))
    return {name: t.detach() for name, t in out.items()}


def hvp_matvec(loss_fn: LossFn, params: Params) -> Callable[[Params], Params]:
    """The product ``v -> H v`` at ``params``, reusable across CG iterations.

    Reverse-over-reverse: the gradient's graph is recorded once (``vjp`` of ``grad``: about one
    gradient's cost) and each product is one backward pass through it, cheaper than a fresh
    ``hvp`` (``t_hvp`` against ``t_hvp_forward_over_reverse`` in ``bench/meta_gradient.py``).
    ``H`` is symmetric, so the vjp ``v^T H`` is ``H v``.  The graph (about two gradients'
    activations) is kept while the returned function lives; memory does not depend on how often
    it is called.
    """
    _, pullback = vjp(grad(loss_fn), _detached(params))

    def product(v: Params) -> Params:
        (out,) = pullback(_detached(v))
        return {name: t.detach() for name, t in out.items()}

    return product


def output_hvp_of(loss_of_output: OutputLoss) -> OutputHVP:
    """The exact output Hessian of ``loss_of_output``, by autodiff (``jvp`` of ``grad``)."""

    def product(output: Tensor, u: Tensor) -> Tensor:
        return jvp(grad(loss_of_output), (output.detach(),), (u.detach(),))[1].detach()

    return product


def dice_bce_curvature(target: Tensor, smooth: float = 1.0, *, psd: bool = True) -> OutputHVP:
    """Output Hessian of ``losses.dice_bce_loss`` w.r.t. the logits, closed form; PSD part.

    The BCE part is convex (diagonal ``s / numel``, ``s = sigmoid'``) but the soft Dice is not:
    per image its logit Hessian is ``diag(q * sigmoid'') + B M B^T / N`` with ``q`` the Dice
    gradient in probabilities, ``B = [s*t, s]`` and a 2x2 indefinite ``M``; both terms have
    negative eigenvalues (measured down to -17% of the largest at undecided logits).  With
    ``psd`` the negative parts of each term are dropped (diagonal clamped at 0; the rank-2 term
    projected exactly through its 2x2 Gram matrix), giving a PSD matrix ``>= H_out`` (Loewner)
    that keeps Dice's curvature, which on small lesions is far larger than BCE's.  ``psd=False``
    gives the exact Hessian (tested against autodiff, so a change in the loss is caught).
    """

    def product(logits: Tensor, u: Tensor) -> Tensor:
        logits, u = logits.detach(), u.detach()
        t = target.to(logits.dtype)
        n = logits.shape[0]
        dims = tuple(range(1, logits.dim()))
        shape = (n,) + (1,) * (logits.dim() - 1)
        sig = torch.sigmoid(logits)
        s = sig * (1 - sig)
        num = 2 * (sig * t).sum(dims) + smooth
        den = sig.sum(dims) + t.sum(dims) + smooth
        q = (-2 * t / den.view(shape) + (num / den**2).view(shape)) / n  # d(Dice loss)/d sigmoid
        diagonal = s / logits.numel() + q * s * (1 - 2 * sig)
        if psd:
            diagonal = diagonal.clamp_min(0)  # BCE's part is already >= 0
        a, b = s * t, s
        m = (
            torch.stack(
                [
                    torch.stack([torch.zeros_like(den), 2 / den**2], -1),
                    torch.stack([2 / den**2, -2 * num / den**3], -1),
                ],
                -2,
            )
            / n
        )
        if psd:
            m = _psd_in_span(m, a, b, dims)
        coef = m @ torch.stack([(a * u).sum(dims), (b * u).sum(dims)], -1).unsqueeze(-1)
        coef = coef.squeeze(-1)
        return diagonal * u + coef[:, 0].view(shape) * a + coef[:, 1].view(shape) * b

    return product


def _psd_in_span(m: Tensor, a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``m+`` (batched 2x2) with ``[a b] m+ [a b]^T`` the PSD part of ``[a b] m [a b]^T``.

    With Gram matrix ``G = [a b]^T [a b]``, ``Q = [a b] G^{-1/2}`` is orthonormal, so the form is
    ``Q C Q^T`` with ``C = G^{1/2} m G^{1/2}``; keep ``C``'s non-negative eigenvalues and map back.
    Pseudo-inverse roots handle ``a`` parallel to ``b`` or zero (empty or full masks).
    """
    gram = torch.stack(
        [
            torch.stack([(a * a).sum(dims), (a * b).sum(dims)], -1),
            torch.stack([(a * b).sum(dims), (b * b).sum(dims)], -1),
        ],
        -2,
    )
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals[..., -1:].clamp_min(torch.finfo(gram.dtype).tiny) * 1e-10
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(gram.dtype).tiny), root * 0)
    g_half = evecs @ torch.diag_embed(root) @ evecs.mT
    g_inv_half = evecs @ torch.diag_embed(inv_root) @ evecs.mT
    c_evals, c_evecs = torch.linalg.eigh(g_half @ m @ g_half)
    c_plus = c_evecs @ torch.diag_embed(c_evals.clamp_min(0)) @ c_evecs.mT
    return g_inv_half @ c_plus @ g_inv_half


def ggn_matvec(
    output_fn: OutputFn, output_hvp: OutputHVP, params: Params
) -> Callable[[Params], Params]:
    """The product ``v -> J^T H_out J v`` at ``params``, reusable across CG iterations.

    ``J`` is the Jacobian of ``output_fn`` at ``params``, ``output_hvp(output, u) = H_out u``
    (``output_hvp_of(loss)`` for a loss's exact output Hessian).  The reverse pass ``J^T`` is
    recorded once and reused, so each product costs one forward-mode pass plus one backward
    pass.  Positive semi-definite whenever ``H_out`` is.
    """
    params = _detached(params)
    output, pullback = vjp(output_fn, params)
    output = output.detach()

    def product(v: Params) -> Params:
        _, jv = jvp(output_fn, (params,), (_detached(v),))
        (jt,) = pullback(output_hvp(output, jv.detach()).detach())
        return {name: t.detach() for name, t in jt.items()}

    return product


def ggn_vp(output_fn: OutputFn, loss_of_output: OutputLoss, params: Params, v: Params) -> Params:
    """Generalised Gauss-Newton product ``J^T H_out J v``, ``H_out`` the output Hessian of
    ``loss_of_output`` (PSD when the loss is convex in the output).  One-shot ``ggn_matvec``."""
    return ggn_matvec(output_fn, output_hvp_of(loss_of_output), params)(v)


def implicit_meta_grad(
    support_loss: LossFn,
    phi: Params,
    query_grad: Params,
    *,
    lam: float | Params,
    config: ImplicitConfig,
    solve: Solver = cg,
    ggn: tuple[OutputFn, OutputHVP] | None = None,
    x0: Params | None = None,
) -> tuple[Params, CGResult]:
    """Solve ``(I + (H + damping I)/lam) v = query_grad`` for iMAML's meta-gradient ``v``.

    ``H`` is the Hessian of ``support_loss`` (the support loss WITHOUT the proximal term) at
    ``phi``; with ``config.hessian == 'ggn'`` it is the Gauss-Newton matrix ``J^T H_out J`` of
    ``ggn = (output_fn, output_hvp)`` instead: ``output_fn(p)`` the support outputs, and
    ``output_hvp`` the support loss's output curvature (``output_hvp_of(loss)``, or a PSD
    version such as ``dice_bce_curvature(target)``).  ``config.cg_steps`` iterations of ``solve``
    starting from ``x0`` (zeros by default); returns ``v`` as a dict and the solver's report.

    ``lam`` may hold one strength per weight tensor (a dict of scalars, ``Lam`` the diagonal
    they make): then ``v = Lam (H + damping I + Lam)^{-1} query_grad``, the derivative of the
    query loss through ``phi* = argmin L_support + 1/2 (phi - theta)^T Lam (phi - theta)``; it is
    solved as ``(I + Lam^{-1/2} (H + damping I) Lam^{-1/2}) w = Lam^{-1/2} query_grad``,
    ``v = Lam^{1/2} w`` (symmetric, so CG applies; one scalar ``lam`` is the same equation).
    """
    if isinstance(lam, dict):
        return _per_tensor_meta_grad(support_loss, phi, query_grad, lam, config, solve, ggn, x0)
    curvature = _curvature(support_loss, phi, config, ggn)
    like = _detached(phi)
    shift = 1.0 + config.damping / lam

    def matvec(x: Tensor) -> Tensor:
        return shift * x + flatten(curvature(unflatten(x, like))) / lam

    b = flatten(_detached(query_grad))
    start = None if x0 is None else flatten(_detached(x0))
    result = solve(matvec, b, maxiter=config.cg_steps, rtol=config.rtol, x0=start)
    return {name: t.clone() for name, t in unflatten(result.solution, like).items()}, result


def _curvature(
    support_loss: LossFn,
    phi: Params,
    config: ImplicitConfig,
    ggn: tuple[OutputFn, OutputHVP] | None,
) -> Callable[[Params], Params]:
    if config.hessian == "ggn":
        if ggn is None:
            raise ValueError("config.hessian == 'ggn' needs ggn=(output_fn, output_hvp)")
        return ggn_matvec(ggn[0], ggn[1], phi)
    if config.hessian == "exact":
        return hvp_matvec(support_loss, phi)
    raise ValueError(f"unknown hessian '{config.hessian}' (use 'exact' or 'ggn')")


def _per_tensor_meta_grad(
    support_loss: LossFn,
    phi: Params,
    query_grad: Params,
    lam: Params,
    config: ImplicitConfig,
    solve: Solver,
    ggn: tuple[OutputFn, OutputHVP] | None,
    x0: Params | None,
) -> tuple[Params, CGResult]:
    """:func:`implicit_meta_grad` with one proximal strength per weight tensor."""
    if set(lam) != set(phi):
        raise ValueError("per-tensor lam needs one strength for every weight tensor of phi")
    curvature = _curvature(support_loss, phi, config, ggn)
    like = _detached(phi)
    root = {k: lam[k].detach().to(like[k]).sqrt() for k in like}

    def scaled(x: Params, power: int) -> Params:
        return {k: x[k] * root[k] ** power for k in like}

    def matvec(x: Tensor) -> Tensor:
        z = scaled(unflatten(x, like), -1)
        hz = curvature(z)
        return x + flatten(scaled({k: hz[k] + config.damping * z[k] for k in like}, -1))

    b = flatten(scaled(_detached(query_grad), -1))
    start = None if x0 is None else flatten(scaled(_detached(x0), -1))
    result = solve(matvec, b, maxiter=config.cg_steps, rtol=config.rtol, x0=start)
    v = scaled(unflatten(result.solution, like), 1)
    return {name: t.clone() for name, t in v.items()}, result


def lam_meta_grad(v: Params, phi: Params, theta: Params) -> Params:
    """The query loss's derivative in each tensor's ``log lam``: ``-<v_k, phi_k - theta_k>``.

    From the stationarity ``grad L_support(phi*) + Lam (phi* - theta) = 0``: ``d phi*/d lam_k =
    -(H + Lam)^{-1} E_k (phi* - theta)`` (``E_k`` selects tensor ``k``), so with ``v = Lam (H +
    Lam)^{-1} g`` (:func:`implicit_meta_grad`) the derivative in ``log lam_k = s_k`` is
    ``lam_k d/d lam_k = -<v_k, phi*_k - theta_k>``: a tensor whose adaptation moved along the
    query gradient's descent direction is let go further, one that moved against it is held.
    """
    return {k: -(v[k].detach() * (phi[k].detach() - theta[k].detach())).sum() for k in v}
