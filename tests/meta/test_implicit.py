"""Curvature products and the implicit meta-gradient against explicitly built matrices."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, hessian, jacrev

from imaml_seg.config import ImplicitConfig
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.algorithms import bce_output_loss
from imaml_seg.meta.implicit import (
    dice_bce_curvature,
    ggn_matvec,
    ggn_vp,
    hvp,
    hvp_matvec,
    implicit_meta_grad,
    lam_meta_grad,
    output_hvp_of,
)
from imaml_seg.meta.linalg import cg
from imaml_seg.model import Params, flatten, forward, get_params, unflatten


@pytest.fixture
def problem(tiny_net, blobs):
    """A tiny float64 net, its weights, a support and a query batch (8x8 images)."""
    net = tiny_net()
    params = get_params(net)
    x, y = blobs(4, 8, seed=1, dtype=torch.float64)
    return net, params, x[:2], y[:2], x[2:], y[2:]


def _flat_fn(fn, like: Params):
    return lambda vec: fn(unflatten(vec, like))


def _random_like(params: Params, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_hvp_matches_full_hessian(problem) -> None:
    net, params, sx, sy, _, _ = problem
    loss = lambda p: dice_bce_loss(forward(net, p, sx), sy)  # noqa: E731
    full = hessian(_flat_fn(loss, params))(flatten(params))
    v = _random_like(params, 0)
    product = hvp(loss, params, v)
    assert set(product) == set(params)
    assert _rel(flatten(product), full @ flatten(v)) < 1e-10
    assert all(t.grad_fn is None for t in product.values())


def test_hvp_matvec_reuses_one_graph_for_many_exact_products(problem) -> None:
    net, params, sx, sy, _, _ = problem
    loss = lambda p: dice_bce_loss(forward(net, p, sx), sy)  # noqa: E731
    full = hessian(_flat_fn(loss, params))(flatten(params))
    leaf = {k: t.clone().requires_grad_() for k, t in params.items()}
    product = hvp_matvec(loss, leaf)
    for seed in range(3):  # the same recorded graph answers every product
        v = _random_like(params, seed)
        out = product(v)
        assert _rel(flatten(out), full @ flatten(v)) < 1e-10
        assert all(t.grad_fn is None and not t.requires_grad for t in out.values())


def test_hvp_keeps_no_graph_even_for_leaf_weights(problem) -> None:
    net, params, sx, sy, _, _ = problem
    leaf = {k: t.clone().requires_grad_() for k, t in params.items()}
    loss = lambda p: dice_bce_loss(forward(net, p, sx), sy)  # noqa: E731
    product = hvp(loss, leaf, _random_like(params, 0))
    assert all(t.grad_fn is None and not t.requires_grad for t in product.values())


@pytest.mark.parametrize("output_loss", [dice_bce_loss, bce_output_loss])
def test_ggn_vp_matches_explicit_gauss_newton(problem, output_loss) -> None:
    net, params, sx, sy, _, _ = problem
    output_fn = lambda p: forward(net, p, sx)  # noqa: E731
    out = output_fn(params).detach()
    jac = jacrev(_flat_fn(output_fn, params))(flatten(params)).reshape(out.numel(), -1)
    h_out = hessian(lambda o: output_loss(o.reshape(out.shape), sy))(out.reshape(-1))
    explicit = jac.T @ h_out @ jac
    v = _random_like(params, 1)
    product = ggn_vp(output_fn, lambda o: output_loss(o, sy), params, v)
    assert _rel(flatten(product), explicit @ flatten(v)) < 1e-10
    if output_loss is bce_output_loss:  # convex in the logits: the Gauss-Newton matrix is PSD
        assert torch.linalg.eigvalsh(explicit).min() > -1e-12
    reused = ggn_matvec(output_fn, output_hvp_of(lambda o: output_loss(o, sy)), params)
    for seed in (2, 3):  # the recorded reverse pass serves many products
        w = _random_like(params, seed)
        assert _rel(flatten(reused(w)), explicit @ flatten(w)) < 1e-10


def _logits_and_masks(bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Four 6x6 images: a small disc, an empty mask, a full mask, a random mask."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    disc = (((yy - 2.5) ** 2 + (xx - 2.5) ** 2) <= 2.5).double()
    masks = torch.stack(
        [disc, torch.zeros(6, 6), torch.ones(6, 6), (torch.rand(6, 6, generator=g) > 0.5)]
    ).double()[:, None]
    logits = bias + torch.randn(masks.shape, generator=g, dtype=torch.float64)
    return logits, masks


def _dense(product, logits: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(logits.numel(), dtype=logits.dtype)
    return torch.stack([product(logits, e.view_as(logits)).reshape(-1) for e in eye], 1)


@pytest.mark.parametrize("bias", [0.0, -3.0])
def test_dice_bce_curvature_is_the_exact_logit_hessian_or_its_psd_part(bias: float) -> None:
    logits, masks = _logits_and_masks(bias)
    exact = hessian(lambda z: dice_bce_loss(z.view_as(logits), masks))(logits.reshape(-1))
    closed = _dense(dice_bce_curvature(masks, psd=False), logits)
    assert _rel(closed, exact) < 1e-10  # fails if losses.dice_bce_loss changes its formula
    psd = _dense(dice_bce_curvature(masks), logits)
    assert torch.allclose(psd, psd.T, atol=1e-14)
    scale = float(torch.linalg.eigvalsh(exact).abs().max())
    assert torch.linalg.eigvalsh(psd).min() > -1e-12 * scale
    assert torch.linalg.eigvalsh(psd - exact).min() > -1e-12 * scale  # psd >= exact (Loewner)


def test_the_soft_dice_makes_the_exact_logit_hessian_indefinite() -> None:
    logits, masks = _logits_and_masks(0.0)
    exact = hessian(lambda z: dice_bce_loss(z.view_as(logits), masks))(logits.reshape(-1))
    eig = torch.linalg.eigvalsh(exact)
    assert eig.min() < -0.01 * eig.max()


def _exact_system(net, params, sx, sy, qx, qy):
    loss = lambda p: dice_bce_loss(forward(net, p, sx), sy)  # noqa: E731
    h = hessian(_flat_fn(loss, params))(flatten(params))
    g = grad(lambda p: dice_bce_loss(forward(net, p, qx), qy))(params)
    return loss, (h + h.T) / 2, g


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_implicit_meta_grad_matches_dense_solve(problem, damping: float) -> None:
    net, params, sx, sy, qx, qy = problem
    loss, h, g = _exact_system(net, params, sx, sy, qx, qy)
    n = h.shape[0]
    lam = 2 * max(-float(torch.linalg.eigvalsh(h).min()), 0.0) + 0.5  # I + H/lam is then PD
    eye = torch.eye(n, dtype=h.dtype)
    system = eye + (h + damping * eye) / lam
    assert torch.linalg.eigvalsh(system).min() > 0.4
    expected = torch.linalg.solve(system, flatten(g))
    config = ImplicitConfig(cg_steps=3 * n, damping=damping, rtol=1e-13, hessian="exact")
    v, result = implicit_meta_grad(loss, params, g, lam=lam, config=config)
    assert result.status == "converged", result.residuals[-5:]
    assert set(v) == set(params)
    assert _rel(flatten(v), expected) < 1e-6


def test_implicit_meta_grad_ggn_matches_dense_solve(problem) -> None:
    net, params, sx, sy, qx, qy = problem
    loss, _, g = _exact_system(net, params, sx, sy, qx, qy)
    output_fn = lambda p: forward(net, p, sx)  # noqa: E731
    jac = jacrev(_flat_fn(output_fn, params))(flatten(params)).reshape(sx.shape[0] * 64, -1)
    h_out = hessian(lambda o: bce_output_loss(o.reshape(sy.shape), sy))(
        output_fn(params).detach().reshape(-1)
    )
    ggn_matrix = jac.T @ h_out @ jac  # BCE: convex in the logits, PSD
    lam = 0.1
    n = ggn_matrix.shape[0]
    expected = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + ggn_matrix / lam, flatten(g))
    config = ImplicitConfig(cg_steps=3 * n, hessian="ggn", rtol=1e-13)
    ggn = (output_fn, output_hvp_of(lambda o: bce_output_loss(o, sy)))
    v, result = implicit_meta_grad(loss, params, g, lam=lam, config=config, ggn=ggn)
    assert result.status == "converged"
    assert _rel(flatten(v), expected) < 1e-6


def test_implicit_meta_grad_on_quadratic_equals_closed_form() -> None:
    """L(phi) = 1/2 (phi - a)^T A (phi - a) has H = A: the solve is (I + A/lam)^-1 g."""
    gen = torch.Generator().manual_seed(0)
    d = 6
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a_mat = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)
    a_vec = torch.randn(d, generator=gen, dtype=torch.float64)
    phi = {"w": torch.randn(d, generator=gen, dtype=torch.float64)}
    g = {"w": torch.randn(d, generator=gen, dtype=torch.float64)}

    def support_loss(p: Params) -> torch.Tensor:
        diff = p["w"] - a_vec
        return 0.5 * diff @ a_mat @ diff

    lam = 2.0
    v, result = implicit_meta_grad(
        support_loss,
        phi,
        g,
        lam=lam,
        config=ImplicitConfig(cg_steps=d, rtol=1e-14, hessian="exact"),
    )
    expected = lam * torch.linalg.solve(a_mat + lam * torch.eye(d, dtype=torch.float64), g["w"])
    assert result.iterations <= d
    assert _rel(v["w"], expected) < 1e-10


def test_implicit_meta_grad_uses_the_given_solver() -> None:
    seen = {}

    def identity_solver(matvec, b, *, maxiter, rtol=1e-10, x0=None):
        seen["maxiter"], seen["rtol"] = maxiter, rtol
        return cg(matvec, b, maxiter=0)

    phi = {"w": torch.ones(3, dtype=torch.float64)}
    g = {"w": torch.arange(3.0, dtype=torch.float64)}
    config = ImplicitConfig(cg_steps=4, rtol=1e-5, hessian="exact")
    v, result = implicit_meta_grad(
        lambda p: (p["w"] ** 2).sum(), phi, g, lam=1.0, config=config, solve=identity_solver
    )
    assert seen == {"maxiter": 4, "rtol": 1e-5}
    assert result.status == "maxiter" and torch.count_nonzero(v["w"]) == 0


def test_ggn_without_output_functions_is_an_error() -> None:
    phi = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="ggn"):
        implicit_meta_grad(
            lambda p: p["w"].sum(), phi, phi, lam=1.0, config=ImplicitConfig(hessian="ggn")
        )


def test_nonfinite_curvature_is_reported_and_solution_finite(problem) -> None:
    net, params, sx, sy, qx, qy = problem
    bad = sx.clone()
    bad[0, 0, 0, 0] = math.nan
    loss = lambda p: dice_bce_loss(forward(net, p, bad), sy)  # noqa: E731
    g = grad(lambda p: dice_bce_loss(forward(net, p, qx), qy))(params)
    v, result = implicit_meta_grad(
        loss, params, g, lam=1.0, config=ImplicitConfig(cg_steps=5, hessian="exact")
    )
    assert result.status == "nonfinite"
    assert all(torch.isfinite(t).all() for t in v.values())


def test_per_tensor_lam_meta_gradients_equal_the_closed_form_derivatives() -> None:
    """Quadratic support loss ``1/2 (phi - c)^T A (phi - c)`` over two tensors, strengths
    ``lam = exp(s)`` per tensor: ``phi* = (A + Lam)^-1 (A c + Lam theta)`` in closed form, so
    autograd through it gives the derivatives of the query loss ``1/2 phi*^T B phi* + e^T phi*``
    in ``theta`` and in ``s``; the CG solve and ``lam_meta_grad`` must give both."""
    gen = torch.Generator().manual_seed(3)
    sizes = {"a": 4, "b": 3}
    d = sum(sizes.values())

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    m, q = rand(d, d), rand(d, d)
    a_mat, b_mat = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64), q @ q.T
    c, e = rand(d), rand(d)
    theta = rand(d).requires_grad_()
    s = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    lam_flat = torch.cat([s[0].exp().expand(4), s[1].exp().expand(3)])
    phi = torch.linalg.solve(a_mat + torch.diag(lam_flat), a_mat @ c + lam_flat * theta)
    query = 0.5 * phi @ b_mat @ phi + e @ phi
    d_theta, d_s = torch.autograd.grad(query, (theta, s))

    def split(x: torch.Tensor) -> Params:
        return {"a": x[:4].detach(), "b": x[4:].detach()}

    def support_loss(p: Params) -> torch.Tensor:
        diff = torch.cat([p["a"], p["b"]]) - c
        return 0.5 * diff @ a_mat @ diff

    phi_d, theta_d = split(phi), split(theta)
    g = split(b_mat @ phi.detach() + e)
    lam = {"a": s[0].detach().exp(), "b": s[1].detach().exp()}
    config = ImplicitConfig(cg_steps=d, rtol=1e-14, hessian="exact")
    v, result = implicit_meta_grad(support_loss, phi_d, g, lam=lam, config=config)
    assert result.iterations <= d
    assert _rel(torch.cat([v["a"], v["b"]]), d_theta) < 1e-10
    found = lam_meta_grad(v, phi_d, theta_d)
    assert _rel(torch.stack([found["a"], found["b"]]), d_s) < 1e-10


def test_equal_per_tensor_strengths_solve_the_one_lam_equation(problem) -> None:
    net, params, sx, sy, qx, qy = problem
    loss, _, g = _exact_system(net, params, sx, sy, qx, qy)
    config = ImplicitConfig(cg_steps=4, damping=0.2, hessian="exact")
    one, _ = implicit_meta_grad(loss, params, g, lam=3.0, config=config)
    lam = {k: torch.tensor(3.0, dtype=torch.float64) for k in params}
    each, _ = implicit_meta_grad(loss, params, g, lam=lam, config=config)
    assert _rel(flatten(each), flatten(one)) < 1e-10
    with pytest.raises(ValueError, match="every weight tensor"):
        implicit_meta_grad(loss, params, g, lam=dict(list(lam.items())[:1]), config=config)
