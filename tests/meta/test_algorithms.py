"""Meta-gradients of iMAML, MAML, FOMAML and Reptile against closed forms and differences."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import grad

from imaml_seg.config import (
    ConfigError,
    ImplicitConfig,
    InnerConfig,
    MetaConfig,
    ModelConfig,
    RunConfig,
    validate,
)
from imaml_seg.data.tasks import Task
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.algorithms import (
    META_ALGORITHMS,
    OUTER_RULE,
    bce_output_loss,
    ggn_curvature,
    meta_gradient,
    supervised_grad,
)
from imaml_seg.meta.inner import adapt, all_finite
from imaml_seg.model import build_model, flatten, forward, get_params


def sum_squares(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum()


def _config(**inner) -> RunConfig:
    implicit = inner.pop("implicit", ImplicitConfig(hessian="exact"))
    return RunConfig(inner=InnerConfig(**inner), implicit=implicit)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("hessian", ["exact", "ggn"])
def test_imaml_on_linear_regression_equals_analytic_meta_gradient(hessian: str) -> None:
    """phi* = (A + lam I)^-1 (X^T y + lam theta); d Lq(phi*)/d theta = lam (A + lam I)^-1 gq."""
    gen = torch.Generator().manual_seed(0)
    d = 5
    net = nn.Linear(d, 1, bias=False).double()
    data = [torch.randn(8, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    sx, qx = data
    sy, qy = (torch.randn(8, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    theta = {"weight": torch.randn(1, d, generator=gen, dtype=torch.float64)}
    task = Task(sx, sy, qx, qy)
    lam = 3.0
    a = sx.T @ sx
    system = a + lam * torch.eye(d, dtype=torch.float64)
    phi = torch.linalg.solve(system, sx.T @ sy[:, 0] + lam * theta["weight"][0])
    query_grad = qx.T @ (qx @ phi - qy[:, 0])
    expected = lam * torch.linalg.solve(system, query_grad)

    eig = torch.linalg.eigvalsh(system)
    config = _config(
        inner_steps=1000,
        inner_lr=2.0 / float(eig.max() + eig.min()),
        lam=lam,
        implicit=ImplicitConfig(cg_steps=d, hessian=hessian, rtol=1e-14),
    )
    result = meta_gradient("imaml", net, theta, task, config, loss_fn=sum_squares)
    assert result.ok
    assert _rel(result.grad["weight"][0], expected) < 1e-8
    assert result.stats["cg_status"] == "converged"
    assert result.query_loss == pytest.approx(float(sum_squares(qx @ phi[:, None], qy)))


def _tiny_task(blobs, seed: int = 1) -> Task:
    x, y = blobs(4, 8, seed=seed, dtype=torch.float64)
    return Task(x[:2], y[:2], x[2:], y[2:])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_maml_matches_central_finite_differences(tiny_net, blobs, optimizer: str) -> None:
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    lr = 0.5 if optimizer == "sgd" else 0.05
    config = _config(inner_steps=2, inner_lr=lr, optimizer=optimizer)
    result = meta_gradient("maml", net, theta, task, config)
    assert result.ok

    def meta_loss(vector: torch.Tensor) -> float:
        start, params = 0, {}
        for k, t in theta.items():
            params[k] = vector[start : start + t.numel()].view_as(t)
            start += t.numel()
        phi = adapt(net, params, task.support_x, task.support_y, config.inner).params
        return float(dice_bce_loss(forward(net, phi, task.query_x), task.query_y))

    flat = flatten(theta)
    eps = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        numeric[i] = (meta_loss(flat + step) - meta_loss(flat - step)) / (2 * eps)
    assert _rel(flatten(result.grad), numeric) < 1e-6
    # Second order matters here: the first-order answer is clearly different.
    first_order = meta_gradient("fomaml", net, theta, task, config)
    assert _rel(flatten(first_order.grad), numeric) > 1e-3


def test_imaml_tends_to_the_query_gradient_as_lam_grows(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    distances = []
    for lam in (10.0, 100.0, 1e4, 1e6):
        # Proximal SGD is stable only for inner_lr * lam < 2.
        implicit = ImplicitConfig(cg_steps=20, hessian="exact")
        config = _config(inner_steps=5, inner_lr=min(0.1, 1 / lam), lam=lam, implicit=implicit)
        result = meta_gradient("imaml", net, theta, task, config)
        assert result.ok
        phi = adapt(net, theta, task.support_x, task.support_y, config.inner, proximal=True).params
        g = grad(lambda p: dice_bce_loss(forward(net, p, task.query_x), task.query_y))(phi)
        distances.append(_rel(flatten(result.grad), flatten(g)))
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 1e-3


def test_fomaml_is_the_query_gradient_at_the_adapted_weights(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    config = _config(inner_steps=3, inner_lr=0.2)
    result = meta_gradient("fomaml", net, theta, task, config)
    phi = adapt(net, theta, task.support_x, task.support_y, config.inner).params
    g = grad(lambda p: dice_bce_loss(forward(net, p, task.query_x), task.query_y))(phi)
    assert result.ok
    assert all(torch.allclose(result.grad[k], g[k]) for k in theta)


def test_reptile_returns_theta_minus_phi_on_support_and_query(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    config = _config(inner_steps=3, inner_lr=0.2)
    result = meta_gradient("reptile", net, theta, task, config)
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    phi = adapt(net, theta, x, y, config.inner).params
    assert result.ok
    assert all(torch.allclose(result.grad[k], theta[k] - phi[k]) for k in theta)
    assert OUTER_RULE["reptile"] == "sgd"
    assert set(OUTER_RULE) == set(META_ALGORITHMS)


@pytest.mark.parametrize("algorithm", META_ALGORITHMS)
@pytest.mark.parametrize("where", ["support_x", "query_y"])
def test_nan_in_task_data_is_flagged_and_never_leaks(tiny_net, blobs, algorithm, where) -> None:
    net = tiny_net()
    theta = get_params(net)
    before = {k: t.clone() for k, t in theta.items()}
    task = _tiny_task(blobs)
    poisoned = getattr(task, where).clone()
    poisoned[0, 0, 1, 1] = math.nan
    task = Task(**{**task.__dict__, where: poisoned})
    config = _config(
        inner_steps=2, inner_lr=0.1, implicit=ImplicitConfig(cg_steps=2, hessian="exact")
    )
    result = meta_gradient(algorithm, net, theta, task, config)
    assert not result.ok
    assert result.stats["reason"] in ("inner_nonfinite", "query_nonfinite")
    assert all_finite(result.grad)
    assert set(result.grad) == set(theta)
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_nonfinite_curvature_flags_the_task(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    config = _config(inner_steps=2, inner_lr=0.1, implicit=ImplicitConfig(hessian="ggn"))

    def poisoned_curvature(target: torch.Tensor):
        return lambda output, u: u * math.nan  # finite losses elsewhere, NaN products in CG

    result = meta_gradient("imaml", net, theta, task, config, output_curvature=poisoned_curvature)
    assert not result.ok
    assert result.stats["cg_status"] == "nonfinite"
    assert result.stats["reason"] == "cg_nonfinite"
    assert all_finite(result.grad)


def test_a_solve_that_never_beats_zero_flags_the_task(tiny_net, blobs) -> None:
    """Negative curvature at the first CG step would return v = 0: skipped, not a silent zero."""
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    config = _config(inner_steps=2, inner_lr=0.1, implicit=ImplicitConfig(hessian="ggn"))

    def concave(target: torch.Tensor):
        return lambda output, u: -1e6 * u

    result = meta_gradient("imaml", net, theta, task, config, output_curvature=concave)
    assert not result.ok
    assert result.stats["cg_status"] == "diverged"
    assert result.stats["reason"] == "cg_no_progress"


@pytest.mark.parametrize(
    ("algorithm", "hessian"),
    [
        ("imaml", "exact"),
        ("imaml", "ggn"),
        ("maml", "exact"),
        ("fomaml", "exact"),
        ("reptile", "exact"),
    ],
)
def test_every_algorithm_runs_on_a_unet(blobs, algorithm: str, hessian: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(features=(2, 2, 2, 2, 2, 2)))
    theta = get_params(model)
    x, y = blobs(4, 32, seed=3)
    task = Task(x[:2], y[:2], x[2:], y[2:])
    implicit = ImplicitConfig(cg_steps=2, hessian=hessian)
    # lam large enough for the exact Hessian: at lam = 1 this tiny U-Net meets negative curvature
    # at the first CG step (the trap in DESIGN.md), which is flagged as cg_no_progress.
    config = _config(inner_steps=2, inner_lr=0.01, lam=100.0, implicit=implicit)
    result = meta_gradient(algorithm, model, theta, task, config)
    assert result.ok, result.stats
    assert set(result.grad) == set(theta) and all_finite(result.grad)
    assert all(t.grad_fn is None for t in result.grad.values())
    assert math.isfinite(result.query_loss) and math.isfinite(result.support_loss)
    if algorithm == "imaml":
        assert {"cg_residual", "cg_iterations", "cg_status"} <= set(result.stats)
    if hessian == "ggn":
        curvature = ggn_curvature(bce_output_loss)
        bce = meta_gradient(algorithm, model, theta, task, config, output_curvature=curvature)
        assert bce.ok and all_finite(bce.grad)


@pytest.mark.parametrize("algorithm", ["imaml", "maml", "fomaml"])
def test_start_weight_adds_the_starts_own_query_gradient(tiny_net, blobs, algorithm) -> None:
    """Objective ``Lq(phi(theta)) + w Lq(theta)``: the plain meta-gradient plus ``w`` times the
    query gradient at theta itself (by autograd on a leaf copy)."""
    net = tiny_net()
    theta = get_params(net)
    task = _tiny_task(blobs)
    plain = _config(inner_steps=3, inner_lr=0.2)
    weighted = replace(plain, meta=replace(plain.meta, start_weight=0.7))
    base = meta_gradient(algorithm, net, theta, task, plain)
    result = meta_gradient(algorithm, net, theta, task, weighted)
    leaf = {k: t.clone().requires_grad_() for k, t in theta.items()}
    start_loss = dice_bce_loss(forward(net, leaf, task.query_x), task.query_y)
    start_loss.backward()
    assert base.ok and result.ok
    assert "start_query_loss" not in base.stats
    assert result.stats["start_query_loss"] == pytest.approx(float(start_loss.detach()))
    assert result.query_loss == base.query_loss
    for k in theta:
        torch.testing.assert_close(result.grad[k], base.grad[k] + 0.7 * leaf[k].grad)


def test_start_weight_is_refused_for_reptile(tiny_net, blobs) -> None:
    config = RunConfig(meta=MetaConfig(algorithm="reptile", start_weight=1.0))
    with pytest.raises(ConfigError, match="start_weight needs a meta-gradient"):
        validate(config)
    validate(replace(config, meta=replace(config.meta, start_weight=0.0)))
    net = tiny_net()
    with pytest.raises(ValueError, match="Reptile has none"):
        meta_gradient("reptile", net, get_params(net), _tiny_task(blobs), config)


def test_supervised_grad_matches_autograd(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    x, y = blobs(3, 8, dtype=torch.float64)
    g, value = supervised_grad(net, theta, x, y)
    leaf = {k: t.clone().requires_grad_() for k, t in theta.items()}
    loss = dice_bce_loss(forward(net, leaf, x), y)
    loss.backward()
    assert value == pytest.approx(float(loss.detach()))
    assert all(torch.allclose(g[k], leaf[k].grad) for k in theta)


def test_unknown_algorithm_is_an_error(tiny_net, blobs) -> None:
    net = tiny_net()
    with pytest.raises(ValueError, match="unknown"):
        meta_gradient("transfer", net, get_params(net), _tiny_task(blobs), RunConfig())
