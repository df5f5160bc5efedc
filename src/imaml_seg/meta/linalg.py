"""Conjugate gradient on a matrix given only as a product, with guards for the meta-gradient.

iMAML's linear system ``(I + H/lam) v = g`` is symmetric, but the Hessian of a segmentation loss is
indefinite and badly scaled, so CG may meet negative curvature or blow up.  ``cg`` therefore
watches its own residual, stops on negative curvature, non-finite numbers or divergence, and
always returns the iterate with the smallest residual seen (early stopping at the best residual).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """What ``cg`` found and how it went."""

    solution: Tensor
    """The iterate with the smallest relative residual seen; always finite."""
    residuals: list[float]
    """Relative residual ``||b - A x_i|| / ||b||`` after each iteration; index 0 is the start."""
    status: str
    """'converged' | 'maxiter' | 'diverged' (negative curvature or runaway) | 'nonfinite'."""
    iterations: int
    """CG updates carried out (``len(residuals) - 1``)."""

    @property
    def residual(self) -> float:
        """Relative residual of ``solution`` (the smallest in ``residuals``)."""
        return min(self.residuals)


class Solver(Protocol):
    """Anything with ``cg``'s signature can solve iMAML's system."""

    def __call__(
        self, matvec: MatVec, b: Tensor, *, maxiter: int, rtol: float = ..., x0: Tensor | None = ...
    ) -> CGResult: ...


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def cg(
    matvec: MatVec,
    b: Tensor,
    *,
    maxiter: int,
    rtol: float = 1e-10,
    x0: Tensor | None = None,
    divergence_factor: float = 1e3,
) -> CGResult:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec(x) = A x``.

    ``b`` and ``x`` are flat vectors.  Plain (unpreconditioned) CG, at most ``maxiter`` products,
    stopping once ``||r|| <= rtol ||b||`` ('converged').  The residual is the recursively updated
    one (equal to ``b - A x`` in exact arithmetic; no extra products).  Guards, since ``A`` may
    not be positive definite in practice:

    - ``p^T A p <= 0`` (negative curvature: ``A`` is not PD) stops with 'diverged';
    - a residual above ``divergence_factor`` times the best one stops with 'diverged';
    - a NaN/Inf in a product or an iterate stops with 'nonfinite'.

    In every case the returned solution is the iterate with the smallest residual seen (``x0`` or
    zeros if none improved on it), and it is finite.
    """
    if x0 is None or not _finite(x0):
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.detach().clone()
        r = b - matvec(x)
    b_norm = float(torch.linalg.vector_norm(b))
    if not math.isfinite(b_norm):
        return CGResult(torch.zeros_like(b), [math.inf], "nonfinite", 0)
    if b_norm == 0.0:
        return CGResult(torch.zeros_like(b), [0.0], "converged", 0)
    if not _finite(r):
        return CGResult(x, [math.inf], "nonfinite", 0)

    rr = torch.dot(r, r)
    residuals = [math.sqrt(float(rr)) / b_norm]
    best_x, best = x, residuals[0]
    if best <= rtol:
        return CGResult(best_x, residuals, "converged", 0)
    p = r
    status = "maxiter"
    for _ in range(maxiter):
        ap = matvec(p)
        if not _finite(ap):
            status = "nonfinite"
            break
        curvature = torch.dot(p, ap)
        if float(curvature) <= 0.0:
            status = "diverged"
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        rel = math.sqrt(float(rr_new)) / b_norm
        if not (math.isfinite(rel) and _finite(x)):
            status = "nonfinite"
            break
        residuals.append(rel)
        if rel < best:
            best_x, best = x, rel
        if rel <= rtol:
            status = "converged"
            break
        if rel > divergence_factor * best:
            status = "diverged"
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(best_x, residuals, status, len(residuals) - 1)
