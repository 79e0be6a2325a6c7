"""Random projections (``projector="random"``): APOLLO's Gaussian sketch and GoLore's random basis.

Instead of an SVD of the gradient, P is drawn at each refresh from a generator seeded by
:func:`projection_seed` (the group's ``seed``, the parameter's ordinal, the refresh step), so a
resumed run draws the same matrices.

* :func:`gaussian_projection` — APOLLO (Zhu et al., MLSys 2025, Algorithm 1 and its package
  ``apollo-torch``): entries i.i.d. N(0, 1/r), P of shape m×r (left) or r×n (right). It is not
  orthonormal, but E‖Pᵀx‖² = ‖x‖² (Johnson–Lindenstrauss), which is all APOLLO's scaling factor
  needs. With ``residual="only_scaling"`` the update c·φ∘G never projects back, so the optimizer
  stores the seed (an int) instead of the matrix and regenerates P from it at every step: the
  r·min(m, n) projection costs no memory, one Gaussian draw per step instead.
* :func:`orthonormal_random_projection` — GoLore (He et al., 2024): a basis drawn uniformly from the
  Stiefel manifold (QR of a Gaussian with the signs of R's diagonal, Mezzadri 2007). The other
  residual rules need an orthonormal P (P·Pᵀ must be a projector for G − P·R to be the residual), and
  they project back at every step, so that matrix is stored like an SVD's.

Both are drawn in fp32 (as ``apollo-torch`` does) and cast to the gradient's dtype.
"""
from __future__ import annotations

import math

import torch

_SEED_STRIDE = 1_000_003


def projection_seed(seed: int, ordinal: int, step: int) -> int:
    """The generator seed of parameter ``ordinal``'s projection drawn at ``step`` (also seeds the
    randomized SVD)."""
    return ((seed * _SEED_STRIDE + ordinal) * _SEED_STRIDE + step) % 2**63


def stores_seed_only(group: dict) -> bool:
    """The rule never projects back, so the group keeps the seed of its Gaussian P, not P."""
    return group["projector"] == "random" and group["residual"] == "only_scaling"


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def gaussian_projection(
    shape: tuple[int, int], side: str, rank: int, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """APOLLO's sketch: ``(proj_left, proj_right)`` with N(0, 1/r) entries, the unused side None."""
    m, n = shape
    generator = _generator(seed, device)
    draw = lambda size: (  # noqa: E731
        torch.randn(size, generator=generator, device=device, dtype=torch.float32).div_(math.sqrt(rank))
    ).to(dtype)
    left = draw((m, rank)) if side in ("left", "both") else None
    right = draw((rank, n)) if side in ("right", "both") else None
    return left, right


def _haar_basis(rows: int, rank: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """rows×rank with orthonormal columns, uniformly distributed (QR with R's diagonal made positive)."""
    Q, R = torch.linalg.qr(torch.randn(rows, rank, generator=generator, device=device, dtype=torch.float32))
    return (Q * torch.sgn(torch.diagonal(R)).unsqueeze(0)).contiguous()


def orthonormal_random_projection(
    shape: tuple[int, int], side: str, rank: int, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GoLore's basis: ``(proj_left, proj_right)`` orthonormal (PᵀP = I, Q·Qᵀ = I), each in its own storage."""
    m, n = shape
    generator = _generator(seed, device)
    left = _haar_basis(m, rank, generator, device).to(dtype) if side in ("left", "both") else None
    right = _haar_basis(n, rank, generator, device).T.contiguous().to(dtype) if side in ("right", "both") else None
    return left, right
