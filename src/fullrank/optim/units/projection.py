"""The projection P of GaLore (paper eq. 2–3): which side of G it acts on, and how to apply it
(where P comes from is ``projectors.py``).

A projected m×n gradient ``G`` is reduced to ``R`` by one or two orthonormal matrices kept in the
optimizer state:

* ``"left"``:  ``proj_left``  P (m×r),  R = Pᵀ·G       (r×n), back-projection P·X
* ``"right"``: ``proj_right`` Q (r×n),  R = G·Qᵀ       (m×r), back-projection X·Q
* ``"both"``:  P and Q,                 R = Pᵀ·G·Qᵀ    (r×r), back-projection P·X·Q

``proj_type`` keeps GaLore's meaning: ``std`` projects the smaller dimension (so the moments live
on the larger side, r·max(m, n) each), ``reverse_std`` the larger one, ``left``/``right`` force a
side and ``full`` uses both.
"""
from __future__ import annotations

import torch


PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def projection_side(proj_type: str, shape: tuple[int, int]) -> str:
    """``"left"``, ``"right"`` or ``"both"`` for a gradient of ``shape`` under ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type == "left":
        return "left"
    if proj_type == "right":
        return "right"
    if proj_type == "full":
        return "both"
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def truncated_projection(
    U: torch.Tensor | None, Vh: torch.Tensor | None, rank: int, side: str, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The first ``rank`` singular vectors as ``(proj_left, proj_right)`` in ``dtype``, the unused side
    None (its factor may be None).

    Copies, not views: a slice of U or Vh would keep the whole factor's storage alive (and with an
    adaptive rank the factors are computed at ``max_rank``).
    """
    left = U[..., :rank].to(dtype, copy=True).contiguous() if side in ("left", "both") else None
    right = Vh[..., :rank, :].to(dtype, copy=True).contiguous() if side in ("right", "both") else None
    return left, right


def add_back_(full: torch.Tensor, low: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
              alpha: float = 1.0) -> None:
    """In place, on stacks: ``full ← full + alpha·back(low)`` with one ``baddbmm_`` (no second m×n temporary)."""
    if left is not None and right is not None:
        full.baddbmm_(left, low @ right, alpha=alpha)
    elif left is not None:
        full.baddbmm_(left, low, alpha=alpha)
    else:
        full.baddbmm_(low, right, alpha=alpha)


def low_rank_shape(
    shape: tuple[int, int], left: torch.Tensor | None, right: torch.Tensor | None
) -> torch.Size:
    """Shape of R for an m×n gradient under the given projection."""
    rows = left.shape[-1] if left is not None else shape[0]
    cols = right.shape[-2] if right is not None else shape[1]
    return torch.Size((rows, cols))


def project(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """R = Pᵀ·G, G·Qᵀ or Pᵀ·G·Qᵀ (eq. 2); batched over leading dimensions."""
    low = grad
    if left is not None:
        low = left.mT @ low
    if right is not None:
        low = low @ right.mT
    return low


def project_back(low: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """P·X, X·Q or P·X·Q: a low-rank tensor mapped back to the full shape (eq. 3); batched. (Any
    product left·X·right with a factor left out where it is None.)"""
    full = low
    if left is not None:
        full = left @ full
    if right is not None:
        full = full @ right
    return full


def add_projected_back_(
    param: torch.Tensor,
    low: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    *,
    alpha: float,
    beta: float = 1.0,
) -> None:
    """In place: ``param ← beta·param + alpha·back(low)`` in a single ``addmm_`` (no m×n temporary)."""
    if left is not None and right is not None:
        param.addmm_(left, low @ right, beta=beta, alpha=alpha)
    elif left is not None:
        param.addmm_(left, low, beta=beta, alpha=alpha)
    else:
        param.addmm_(low, right, beta=beta, alpha=alpha)
