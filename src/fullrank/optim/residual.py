"""Residual rules: what happens to the part of the gradient outside the subspace, G − P·R.

GaLore discards it. Fira adds it back scaled by the norm-based factor φ (paper eq. 8–11)::

    S = φ(R) ∘ (G − P·R)
    φ(R) = ‖ψ(R)‖ / ‖R‖                       matrix level  (eq. 10)
    φ(R)_i = ‖ψ(R)_{:,i}‖ / ‖R_{:,i}‖           column level  (eq. 11)

The column level takes one factor per column of G that survives the projection (rows for a right
projection). Rules:

* ``discard``       GaLore: update = α·P·ψ(R)
* ``add``           GaLore-add (Fira w/o scaling): S = G − P·R, unscaled
* ``scale_matrix``  Fira-matrix: S with the matrix-level φ
* ``scale_column``  Fira: S with the column-level φ
* ``only_scaling``  Fira-only-scaling (review discussion) and APOLLO's rule (Zhu et al., MLSys 2025,
                    Algorithm 1): update = φ ∘ G, no subspace term. ``scaling_granularity`` picks
                    the column-level φ (eq. 11, APOLLO's "channel" scaling) or the matrix-level one
                    (eq. 10, APOLLO's "tensor" scaling, which APOLLO-Mini uses at rank 1).

The residual is exactly ``G − P·PᵀG`` (orthogonal to the subspace) whatever α is. The official
``fira`` package subtracts ``α·P·R`` instead; ``residual_convention="official"`` reproduces that
(κ = α below), ``"exact"`` (default) uses κ = 1.

The engine never materialises S: it needs φ and ‖S‖ only, because with orthonormal P each column
satisfies ‖G_i − κ·P·R_i‖² = ‖G_i‖² − (2κ − κ²)·‖R_i‖² (Pythagoras), and the update
α·P·ψ + c·φ∘(G − κ·P·R) is assembled as one ``addmm_`` of ``P·(α·ψ − c·κ·φ∘R)`` plus ``c·φ∘G``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .projector import column_dim, project_back

RESIDUAL_RULES = ("discard", "add", "scale_matrix", "scale_column", "only_scaling")
RESIDUAL_CONVENTIONS = ("exact", "official")
SCALING_GRANULARITIES = ("column", "tensor")

# Added to ‖R‖ in φ's denominator, as the official Fira code does, so that a zero column of R
# (a column of G orthogonal to the subspace) gives a large but finite factor.
PHI_EPS = 1e-8


@dataclass
class ScaledResidual:
    """φ, broadcastable to both G and R (0-d for matrix-level rules), and ‖S‖ as a 0-d tensor (≥ fp32)."""

    phi: torch.Tensor
    norm: torch.Tensor


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms are accumulated in at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def squared_norm(t: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """‖t‖²_F accumulated in ≥ fp32; ``norm`` = ‖t‖ when already computed (the step's non-finite
    check takes every gradient's 2-norm), reused when it has that precision."""
    dtype = norm_dtype(t.dtype)
    if norm is not None and norm.dtype == dtype:
        return norm.square()
    return torch.linalg.vector_norm(t, dtype=dtype).square()


CPU_ROW_BLOCK = 64


def _norms(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """‖t‖, or the norms along ``dim`` (kept as a size-1 dimension), accumulated in ≥ fp32."""
    if dim is None:
        return torch.linalg.vector_norm(t, dtype=norm_dtype(t.dtype))
    if dim == 0 and t.device.type == "cpu" and t.shape[0] > CPU_ROW_BLOCK:
        # torch's CPU kernel reduces a strided dimension ~10× slower than a contiguous one; summing
        # squares over blocks of rows keeps the reads contiguous and the temporary at 64 rows
        total = torch.zeros((1, t.shape[1]), dtype=norm_dtype(t.dtype))
        for block in t.split(CPU_ROW_BLOCK, dim=0):
            total += block.to(total.dtype).square().sum(dim=0, keepdim=True)
        return total.sqrt_()
    return torch.linalg.vector_norm(t, dim=dim, keepdim=True, dtype=norm_dtype(t.dtype))


def uses_columns(rule: str, granularity: str = "column") -> bool:
    """Whether φ is taken per column (and so needs a one-sided projection)."""
    return rule == "scale_column" or (rule == "only_scaling" and granularity == "column")


def scaled_residual(
    rule: str,
    grad: torch.Tensor,
    low: torch.Tensor,
    psi: torch.Tensor,
    side: str,
    kappa: float,
    granularity: str = "column",
    grad_norm: torch.Tensor | None = None,
) -> ScaledResidual | None:
    """φ and ‖S‖ for ``rule`` (None for ``discard``), from G, R = Pᵀ·G and ψ(R).

    ``granularity`` (``column`` | ``tensor``) applies to ``only_scaling`` only; ``grad_norm`` = ‖G‖
    when already computed (used by the per-matrix rules).
    """
    if rule == "discard":
        return None
    dim = column_dim(side) if uses_columns(rule, granularity) else None
    grad_sq = squared_norm(grad, grad_norm) if dim is None else _norms(grad, dim).square()
    if rule == "add":
        phi = torch.ones((), dtype=norm_dtype(grad.dtype), device=grad.device)
    else:
        low_norm = _norms(low, dim)
        phi = _norms(psi, dim) / (low_norm + PHI_EPS)
    if rule == "only_scaling":
        residual_sq = grad_sq
    else:
        low_sq = _norms(low, dim).square() if rule == "add" else low_norm.square()
        residual_sq = (grad_sq - (2.0 * kappa - kappa * kappa) * low_sq).clamp_min_(0.0)
    norm = (phi.square() * residual_sq).sum().sqrt()
    return ScaledResidual(phi=phi, norm=norm)


def explicit_residual(
    grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, kappa: float = 1.0
) -> torch.Tensor:
    """G − κ·P·R materialised (for analysis and tests; the engine's step never builds it)."""
    from .projector import project

    return grad - kappa * project_back(project(grad, left, right), left, right)
