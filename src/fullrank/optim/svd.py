"""Subspace backends: the top-r singular vectors of a gradient.

``exact_svd`` is GaLore's choice (``torch.linalg.svd`` in fp32). ``randomized_svd`` is the
randomized range finder with oversampling and power iterations of Halko, Martinsson & Tropp
(2011, Algorithms 4.4 and 5.1): it costs a few matmuls with an (r + p)-column sketch instead of a
full decomposition, and is what AdaRankGrad uses.

Both return ``(U, S, Vh)`` in at least fp32 with ``U`` (m×k), ``S`` (k,), ``Vh`` (k×n), singular values in
descending order, for ``k = rank``.
"""
from __future__ import annotations

import torch

SVD_BACKENDS = ("exact", "randomized")


def _working_precision(matrix: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs (as GaLore does), the input's own precision otherwise."""
    return matrix.to(torch.promote_types(matrix.dtype, torch.float32))


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a full SVD in at least fp32 (GaLore's projector)."""
    U, S, Vh = torch.linalg.svd(_working_precision(matrix), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank, :]


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a randomized range finder (Halko et al. 2011).

    Sketch ``Y = A·Ω`` with a Gaussian ``Ω`` of ``rank + oversample`` columns, sharpen the spectrum
    with ``power_iters`` rounds of ``Y = A·(Aᵀ·Y)`` (re-orthonormalised by QR each half-step for
    stability), then take the exact SVD of the small matrix ``Qᵀ·A``.
    """
    A = _working_precision(matrix)
    m, n = A.shape
    transposed = m < n
    if transposed:  # sketch the longer side: the QRs then act on the smaller dimension
        A = A.T
        m, n = n, m
    width = min(rank + oversample, n)
    omega = torch.randn(n, width, device=A.device, dtype=A.dtype, generator=generator)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ Ub[:, :rank]
    S, Vh = S[:rank], Vh[:rank, :]
    if transposed:
        return Vh.T, S, U.T
    return U, S, Vh


def top_singular_vectors(
    matrix: torch.Tensor,
    rank: int,
    backend: str,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch to the named backend (``"exact"`` or ``"randomized"``)."""
    if backend == "exact":
        return exact_svd(matrix, rank)
    if backend == "randomized":
        return randomized_svd(
            matrix, rank, oversample=oversample, power_iters=power_iters, generator=generator
        )
    raise ValueError(f"svd must be one of {SVD_BACKENDS}, got {backend!r}")
