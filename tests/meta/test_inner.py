"""adapt(): the inner loop's updates, graph handling, proximal fixed point and guards."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imaml_seg.config import InnerConfig, ModelConfig
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.inner import adapt
from imaml_seg.model import build_model, forward, get_params


def sum_squares(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum()


def _linear_problem(d: int = 5, n: int = 8, seed: int = 0):
    """A linear model ``y = X w``: its loss 1/2 ||X w - y||^2 is a quadratic with A = X^T X."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Linear(d, 1, bias=False).double()
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    theta = {"weight": torch.randn(1, d, generator=gen, dtype=torch.float64)}
    return net, x, y, theta


def test_proximal_adapt_reaches_closed_form_fixed_point() -> None:
    net, x, y, theta = _linear_problem()
    lam = 0.7
    a = x.T @ x
    expected = torch.linalg.solve(
        a + lam * torch.eye(5, dtype=torch.float64), x.T @ y[:, 0] + lam * theta["weight"][0]
    )
    eig = torch.linalg.eigvalsh(a) + lam
    lr = 2.0 / float(eig.max() + eig.min())  # gradient descent's fastest fixed step
    config = InnerConfig(inner_steps=1000, inner_lr=lr, lam=lam)
    result = adapt(net, theta, x, y, config, proximal=True, loss_fn=sum_squares)
    assert result.status == "ok"
    assert torch.allclose(result.params["weight"][0], expected, atol=1e-10)
    assert result.losses[0] == pytest.approx(float(sum_squares(x @ theta["weight"].T, y)))
    assert result.final_loss == pytest.approx(float(sum_squares(x @ expected[:, None], y)))


def test_sgd_step_is_plain_gradient_descent() -> None:
    net, x, y, theta = _linear_problem()
    result = adapt(net, theta, x, y, InnerConfig(inner_lr=0.01), steps=1, loss_fn=sum_squares)
    w = theta["weight"]
    grad = (x @ w.T - y).T @ x
    assert torch.allclose(result.params["weight"], w - 0.01 * grad, atol=1e-14)
    assert len(result.losses) == 1


def test_adam_matches_torch_optim_adam(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    x, y = blobs(2, 8, dtype=torch.float64)
    config = InnerConfig(inner_steps=5, inner_lr=0.05, optimizer="adam")
    result = adapt(net, theta, x, y, config)
    reference = {k: t.clone().requires_grad_() for k, t in theta.items()}
    optimiser = torch.optim.Adam(reference.values(), lr=0.05)
    for _ in range(5):
        optimiser.zero_grad()
        dice_bce_loss(forward(net, reference, x), y).backward()
        optimiser.step()
    for k in theta:
        assert torch.allclose(result.params[k], reference[k].detach(), atol=1e-12), k


def test_graph_only_with_create_graph(tiny_net, blobs) -> None:
    net = tiny_net()
    leaf = {k: t.requires_grad_() for k, t in get_params(net).items()}
    x, y = blobs(2, 8, dtype=torch.float64)
    config = InnerConfig(inner_steps=2, inner_lr=0.1)
    detached = adapt(net, leaf, x, y, config)
    assert all(t.grad_fn is None and not t.requires_grad for t in detached.params.values())
    graphed = adapt(net, leaf, x, y, config, create_graph=True)
    assert all(t.grad_fn is not None for t in graphed.params.values())
    for k in leaf:  # same numbers either way
        assert torch.allclose(graphed.params[k].detach(), detached.params[k])


def test_create_graph_needs_theta_that_requires_grad(tiny_net, blobs) -> None:
    net = tiny_net()
    x, y = blobs(1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="require grad"):
        adapt(net, get_params(net), x, y, InnerConfig(), create_graph=True)


def test_steps_override_and_zero_steps(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    x, y = blobs(2, 8, dtype=torch.float64)
    assert len(adapt(net, theta, x, y, InnerConfig(inner_steps=7), steps=3).losses) == 3
    none = adapt(net, theta, x, y, InnerConfig(inner_steps=7), steps=0)
    assert none.losses == [] and none.status == "ok"
    assert all(torch.equal(none.params[k], theta[k]) for k in theta)
    assert none.final_loss == pytest.approx(float(dice_bce_loss(forward(net, theta, x), y)))


def test_theta_is_left_untouched(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    before = {k: t.clone() for k, t in theta.items()}
    x, y = blobs(2, 8, dtype=torch.float64)
    adapt(net, theta, x, y, InnerConfig(inner_steps=3, optimizer="adam"), proximal=True)
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_nan_in_data_stops_and_returns_finite_weights(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    x, y = blobs(2, 8, dtype=torch.float64)
    x[1, 0, 3, 3] = math.nan
    result = adapt(net, theta, x, y, InnerConfig(inner_steps=5))
    assert result.status == "nonfinite"
    assert len(result.losses) == 1 and math.isnan(result.losses[0])
    assert all(torch.equal(result.params[k], theta[k]) for k in theta)


def infinite_after(calls: int):
    """``sum_squares`` for its first ``calls`` calls, infinite from then on."""
    count = [0]

    def flaky(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        loss = sum_squares(output, target)
        return loss if count[0] <= calls else loss * math.inf

    return flaky


def test_loss_turning_nonfinite_returns_last_finite_weights() -> None:
    net, x, y, theta = _linear_problem()
    config = InnerConfig(inner_steps=10, inner_lr=0.01)
    result = adapt(net, theta, x, y, config, loss_fn=infinite_after(3))
    assert result.status == "nonfinite"
    assert len(result.losses) == 4 and not math.isfinite(result.losses[-1])
    # Weights after two updates: the ones whose loss (the third call) was still finite.
    expected = adapt(net, theta, x, y, config, steps=2, loss_fn=sum_squares)
    assert torch.allclose(result.params["weight"], expected.params["weight"])
    assert result.final_loss == pytest.approx(result.losses[-2])


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.5), ("adam", 0.01)])
def test_sgd_and_adam_lower_the_loss_of_a_small_unet(blobs, optimizer: str, lr: float) -> None:
    torch.manual_seed(0)
    net = build_model(ModelConfig(features=(4, 4, 8, 8, 16, 4)))
    theta = get_params(net)
    x, y = blobs(3, 32, seed=2)
    config = InnerConfig(inner_steps=8, inner_lr=lr, optimizer=optimizer, lam=1.0)
    for proximal in (False, True):
        result = adapt(net, theta, x, y, config, proximal=proximal)
        assert result.status == "ok"
        assert result.final_loss < result.losses[0] - 0.02, (optimizer, proximal, result.losses)


class _WithUnusedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.used


def test_differentiating_adam_through_a_zero_gradient_gives_no_nan() -> None:
    net = _WithUnusedWeight()
    leaf = {k: t.detach().clone().requires_grad_() for k, t in net.named_parameters()}
    x = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    config = InnerConfig(inner_steps=3, inner_lr=0.1, optimizer="adam")
    result = adapt(
        net, leaf, x, torch.zeros_like(x), config, create_graph=True, loss_fn=sum_squares
    )
    outer = sum_squares(forward(net, result.params, x), torch.ones_like(x))
    grads = torch.autograd.grad(outer, list(leaf.values()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert torch.equal(result.params["unused"], leaf["unused"])


def test_augment_shows_step_t_pair_i_under_transform_t_plus_i(blobs) -> None:
    from imaml_seg.data.tasks import dihedral

    x, y = blobs(2, 32)
    seen: list[torch.Tensor] = []

    def recording_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(target.detach().clone())
        return dice_bce_loss(logits, target)

    net = build_model(ModelConfig(features=(4, 4, 8, 8, 16, 4)))
    theta = get_params(net)
    adapt(net, theta, x, y, InnerConfig(inner_steps=3), loss_fn=recording_loss, augment=True)
    assert len(seen) == 4  # 3 steps, then the final loss on the untransformed support set
    for t in range(3):
        for i in range(2):
            assert torch.equal(seen[t][i], dihedral(y[i], (t + i) % 8))
    assert torch.equal(seen[3], y)
    assert not torch.equal(seen[1], y)


def test_observe_sees_the_weights_after_each_number_of_updates() -> None:
    net, x, y, theta = _linear_problem()
    config = InnerConfig(inner_steps=3, inner_lr=0.01)
    seen = {}
    adapt(net, theta, x, y, config, loss_fn=sum_squares, observe=lambda t, p: seen.update({t: p}))
    assert sorted(seen) == [0, 1, 2, 3]
    for t, params in seen.items():
        direct = adapt(net, theta, x, y, config, steps=t, loss_fn=sum_squares).params
        assert torch.equal(params["weight"], direct["weight"])


def test_observe_stops_at_the_last_finite_weights() -> None:
    net, x, y, theta = _linear_problem()
    seen = []
    adapt(net, theta, x, y, InnerConfig(inner_steps=10, inner_lr=0.01), loss_fn=infinite_after(3),
          observe=lambda t, p: seen.append(t))
    assert seen == [0, 1, 2]  # the loss at the weights after 3 updates was infinite


def test_per_tensor_proximal_strengths_reach_their_closed_form_fixed_point() -> None:
    """Weight and bias held by different strengths: ``phi* = (A + Lam)^-1 (X^T y + Lam theta)``
    with ``X`` the inputs with a column of ones; both inner-loop paths reach it."""
    gen = torch.Generator().manual_seed(1)
    net = nn.Linear(4, 1).double()
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    theta = {
        "weight": torch.randn(1, 4, generator=gen, dtype=torch.float64),
        "bias": torch.randn(1, generator=gen, dtype=torch.float64),
    }
    lam = {"weight": torch.tensor(0.5), "bias": torch.tensor(4.0)}
    xs = torch.cat([x, torch.ones(10, 1, dtype=torch.float64)], 1)
    strengths = torch.tensor([0.5] * 4 + [4.0], dtype=torch.float64)
    start = torch.cat([theta["weight"][0], theta["bias"]])
    system = xs.T @ xs + torch.diag(strengths)
    expected = torch.linalg.solve(system, xs.T @ y[:, 0] + strengths * start)
    eig = torch.linalg.eigvalsh(system)
    config = InnerConfig(inner_steps=3000, inner_lr=2.0 / float(eig.max() + eig.min()))
    result = adapt(net, theta, x, y, config, proximal=True, loss_fn=sum_squares, lam=lam)
    found = torch.cat([result.params["weight"][0], result.params["bias"]])
    assert torch.allclose(found, expected, atol=1e-10)
    leaf = {k: v.clone().requires_grad_() for k, v in theta.items()}
    short = InnerConfig(inner_steps=5, inner_lr=0.02)
    kwargs = dict(proximal=True, loss_fn=sum_squares, lam=lam)
    graph = adapt(net, leaf, x, y, short, create_graph=True, **kwargs).params
    plain = adapt(net, theta, x, y, short, **kwargs).params
    for k in theta:
        assert torch.allclose(graph[k].detach(), plain[k], atol=1e-12)


def test_equal_per_tensor_strengths_adapt_like_one_lam(tiny_net, blobs) -> None:
    net = tiny_net()
    theta = get_params(net)
    x, y = blobs(2, 8, dtype=torch.float64)
    config = InnerConfig(inner_steps=3, inner_lr=0.1, lam=2.0)
    one = adapt(net, theta, x, y, config, proximal=True).params
    lam = {k: torch.tensor(2.0) for k in theta}
    each = adapt(net, theta, x, y, config, proximal=True, lam=lam).params
    for k in theta:
        assert torch.allclose(each[k], one[k], atol=1e-14)
    with pytest.raises(ValueError, match="every weight tensor"):
        adapt(net, theta, x, y, config, proximal=True, lam={"0.weight": torch.tensor(1.0)})
