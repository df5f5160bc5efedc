"""Conjugate gradient: exact on SPD systems, guarded on indefinite or non-finite ones."""

from __future__ import annotations

import math

import pytest
import torch

from imaml_seg.meta.linalg import cg


def _spd(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def _true_residual(a: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(b - a @ x) / torch.linalg.vector_norm(b))


def test_cg_matches_direct_solve_on_spd() -> None:
    n = 12
    a = _spd(n, torch.linspace(0.5, 20.0, n, dtype=torch.float64))
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = cg(lambda x: a @ x, b, maxiter=n, rtol=1e-12)
    expected = torch.linalg.solve(a, b)
    assert result.status == "converged"
    assert result.iterations <= n
    assert len(result.residuals) == result.iterations + 1
    assert result.residuals[0] == pytest.approx(1.0)
    assert result.residuals[-1] <= 1e-12 < result.residuals[0]
    assert torch.allclose(result.solution, expected, rtol=1e-9, atol=1e-10)
    # The reported (recursive) residual is the true one of the returned iterate.
    assert _true_residual(a, result.solution, b) == pytest.approx(result.residual, abs=1e-10)


def test_cg_converges_in_as_many_steps_as_distinct_eigenvalues() -> None:
    eig = torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 7.0, 7.0, 7.0], dtype=torch.float64)
    a = _spd(8, eig)
    b = torch.ones(8, dtype=torch.float64)
    result = cg(lambda x: a @ x, b, maxiter=50, rtol=1e-10)
    assert result.status == "converged"
    assert result.iterations == 3
    # A-norm of the error shrinks strictly with every iteration (CG's optimality); here we check
    # the residual ends far below where it started and never rose above it.
    assert max(result.residuals) == result.residuals[0]


def test_cg_starts_from_x0_and_handles_zero_rhs() -> None:
    a = _spd(5, torch.arange(1.0, 6.0, dtype=torch.float64))
    b = torch.arange(5.0, dtype=torch.float64) + 1
    exact = torch.linalg.solve(a, b)
    warm = cg(lambda x: a @ x, b, maxiter=5, x0=exact)
    assert warm.status == "converged" and warm.iterations == 0
    assert torch.allclose(warm.solution, exact)
    zero = cg(lambda x: a @ x, torch.zeros(5, dtype=torch.float64), maxiter=5)
    assert zero.status == "converged" and torch.count_nonzero(zero.solution) == 0


def test_cg_stops_on_negative_curvature_with_best_iterate() -> None:
    # Worked by hand: x1 = (2, 2) has residual 3 > 1, then p^T A p = -72 < 0.
    a = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    b = torch.ones(2, dtype=torch.float64)
    result = cg(lambda x: a @ x, b, maxiter=10)
    assert result.status == "diverged"
    assert result.residuals == pytest.approx([1.0, 3.0])
    assert torch.equal(result.solution, torch.zeros(2, dtype=torch.float64))


def test_cg_on_indefinite_matrix_returns_finite_best_residual_iterate() -> None:
    n = 30
    eig = torch.cat([torch.linspace(0.5, 10.0, n - 3), torch.tensor([-0.3, -1.0, -2.0])])
    a = _spd(n, eig.double(), seed=3)
    b = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = cg(lambda x: a @ x, b, maxiter=n)
    assert result.status == "diverged"
    assert torch.isfinite(result.solution).all()
    assert result.residual == min(result.residuals)
    assert _true_residual(a, result.solution, b) == pytest.approx(result.residual, rel=1e-6)


def test_cg_divergence_factor_stops_a_runaway_residual() -> None:
    a = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    b = torch.ones(2, dtype=torch.float64)
    result = cg(lambda x: a @ x, b, maxiter=10, divergence_factor=2.0)
    assert result.status == "diverged" and result.iterations == 1
    assert torch.equal(result.solution, torch.zeros(2, dtype=torch.float64))


def test_cg_nan_matvec_stops_nonfinite_with_finite_best_iterate() -> None:
    a = _spd(10, torch.linspace(1.0, 100.0, 10, dtype=torch.float64))
    b = torch.ones(10, dtype=torch.float64)
    calls = []

    def matvec(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ x if len(calls) <= 3 else torch.full_like(x, math.nan)

    result = cg(matvec, b, maxiter=10)
    assert result.status == "nonfinite"
    assert result.iterations == 3
    assert torch.isfinite(result.solution).all()
    assert _true_residual(a, result.solution, b) == pytest.approx(result.residual, rel=1e-8)


def test_cg_nonfinite_inputs_give_finite_output() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    bad_b = torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)
    result = cg(lambda x: eye @ x, bad_b, maxiter=3)
    assert result.status == "nonfinite" and torch.isfinite(result.solution).all()
    nan_from_start = cg(lambda x: torch.full_like(x, math.inf), torch.ones(3), maxiter=3)
    assert nan_from_start.status == "nonfinite"
    assert torch.equal(nan_from_start.solution, torch.zeros(3))
