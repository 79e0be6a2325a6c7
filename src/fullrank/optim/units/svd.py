"""Subspace backends: the top-r singular vectors of a gradient.

``exact_svd`` is GaLore's choice (``torch.linalg.svd`` in fp32). ``randomized_svd`` is the
randomized range finder with oversampling and power iterations of Halko, Martinsson & Tropp
(2011, Algorithms 4.4 and 5.1): it costs a few matmuls with an (r + p)-column sketch instead of a
full decomposition, and is what AdaRankGrad uses.

The backends are units of ``SVD_REGISTRY`` (``svd=``), each declaring its options. ``warm_subspace``
is the refresh from the previous basis: one or two rounds of subspace (power)
iteration Y = G·(Gᵀ·P), QR (LDAdam, GaLore 2 and AdaRankGrad's online updates go this way). It
costs two matmuls with an r-column basis and one QR, no decomposition of G.

Both SVD backends return ``(U, S, Vh)`` in at least fp32 with ``U`` (…×m×k), ``S`` (…×k), ``Vh``
(…×k×n), singular values in descending order, for ``k = rank``. Every function accepts a batch of
matrices (…×m×n), so a bucket of same-shape gradients is refreshed in one call.
"""
from __future__ import annotations

import torch

from ..base.options import Option, OptionValues, integer
from ..base.units import Registry, Unit


def _working_precision(matrix: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs (as GaLore does), the input's own precision otherwise."""
    return matrix.to(torch.promote_types(matrix.dtype, torch.float32))


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a full SVD in at least fp32 (GaLore's projector)."""
    U, S, Vh = torch.linalg.svd(_working_precision(matrix), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    sketch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a randomized range finder (Halko et al. 2011).

    Sketch ``Y = A·Ω`` with a Gaussian ``Ω`` of ``rank + oversample`` columns, sharpen the spectrum
    with ``power_iters`` rounds of ``Y = A·(Aᵀ·Y)`` (re-orthonormalised by QR each half-step for
    stability), then take the exact SVD of the small matrix ``Qᵀ·A``. ``sketch`` gives Ω (…×n'×k, n'
    the shorter side) for a batch whose matrices draw their own Ω from their own generators.
    """
    A = _working_precision(matrix)
    m, n = A.shape[-2:]
    transposed = m < n
    if transposed:  # sketch the longer side: the QRs then act on the smaller dimension
        A = A.mT
        m, n = n, m
    width = min(rank + oversample, n)
    if sketch is None:
        sketch = torch.randn(n, width, device=A.device, dtype=A.dtype, generator=generator)
    omega = sketch.to(A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    U = Q @ Ub[..., :rank]
    S, Vh = S[..., :rank], Vh[..., :rank, :]
    if transposed:
        return Vh.mT, S, U.mT
    return U, S, Vh


def draw_sketch(shape: tuple[int, int], rank: int, oversample: int, dtype: torch.dtype,
                generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The randomized SVD's Gaussian Ω for an m×n matrix of ``dtype`` (drawn as ``randomized_svd``
    draws it itself), so that matrices of a batch can each use their own generator."""
    n = min(shape)
    work = torch.promote_types(dtype, torch.float32)
    return torch.randn(n, min(rank + oversample, n), device=device, dtype=work, generator=generator)


def warm_subspace(matrix: torch.Tensor, basis: torch.Tensor, side: str, iters: int = 1) -> torch.Tensor:
    """A new rank-r basis of ``matrix`` by ``iters`` rounds of subspace iteration from ``basis``.

    ``side="left"``: ``basis`` is P (…×m×r), the new P spans G·(Gᵀ·P) (the top left singular subspace
    as iters grows); ``side="right"``: ``basis`` is Q (…×r×n), the new Q spans (Gᵀ·(G·Qᵀ))ᵀ. Each
    round is orthonormalised by QR with R's diagonal made non-negative, so every new basis vector
    stays on the side of the old one it grew from (pᵢᵀ·G·Gᵀ·pᵢ ≥ 0): the coordinates that Adam's
    moments are kept in move as little as the subspace does. Returned in at least fp32.
    """
    A = _working_precision(matrix)
    if side == "right":  # the row space of G is the column space of Gᵀ
        A, basis = A.mT, basis.mT
    Y = basis.to(A.dtype)
    for _ in range(iters):
        Q, R = torch.linalg.qr(A @ (A.mT @ Y))
        signs = torch.sgn(torch.diagonal(R, dim1=-2, dim2=-1))
        Y = Q * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(-2)
    return Y.mT if side == "right" else Y


class SVDBackend(Unit):
    """How a refresh finds P: ``factors(grads, rank, values, generators)`` → (U, S, Vh) of a stack of
    gradients. ``warm_start``: it refines the previous basis instead (``refine``), when there is one."""

    warm_start = False
    uses_generators = False  # factors() draws from one seeded generator per matrix

    def factors(self, grads: torch.Tensor, rank: int, values: OptionValues, generators=None):
        raise NotImplementedError


class ExactSVD(SVDBackend):
    """GaLore's: ``torch.linalg.svd`` in at least fp32."""

    name = "exact"

    def factors(self, grads, rank, values, generators=None):
        return exact_svd(grads, rank)


class RandomizedSVD(SVDBackend):
    """Halko et al.'s range finder (AdaRankGrad's), each matrix sketched from its own generator."""

    name = "randomized"
    uses_generators = True
    options = {
        "oversample": Option(8, integer(0), "the randomized SVD's sketch oversampling p"),
        "power_iters": Option(2, integer(0), "the randomized SVD's power iterations q"),
    }

    def factors(self, grads, rank, values, generators=None):
        shape = tuple(grads.shape[-2:])
        sketches = [draw_sketch(shape, rank, values.oversample, grads.dtype, generator, grads.device)
                    for generator in generators]
        sketch = sketches[0].unsqueeze(0) if len(sketches) == 1 else torch.stack(sketches)
        return randomized_svd(grads, rank, oversample=values.oversample, power_iters=values.power_iters,
                              sketch=sketch)


class WarmSubspace(ExactSVD):
    """Subspace iteration from the previous basis (``warm_subspace``); exact at a first refresh."""

    name = "warm"
    warm_start = True
    options = {"warm_iters": Option(1, integer(1), "rounds of subspace iteration of svd='warm'")}

    def refine(self, grads: torch.Tensor, previous: torch.Tensor, side: str, values: OptionValues) -> torch.Tensor:
        return warm_subspace(grads, previous, side, values.warm_iters)

    def validate(self, values):
        if values.rank_energy is not None:
            raise ValueError("svd='warm' refines the previous basis at its rank and reads no spectrum; rank_energy "
                             "(adaptive rank) needs svd in ('exact', 'randomized')")


SVD_REGISTRY = Registry("SVD backend", "svd", SVDBackend)
for _backend in (ExactSVD(), RandomizedSVD(), WarmSubspace()):
    SVD_REGISTRY.register(_backend)
