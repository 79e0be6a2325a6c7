"""Norms of stacks of matrices, accumulated in at least fp32: of whole matrices, and of the columns
that a one-sided projection keeps (paper eq. 10–11)."""
from __future__ import annotations

import torch

_NORM_DTYPES: dict[torch.dtype, torch.dtype] = {}


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms are accumulated in at least fp32 (cached: ``torch.promote_types`` is a dispatched op)."""
    if dtype not in _NORM_DTYPES:
        _NORM_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return _NORM_DTYPES[dtype]


def matrix_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_b‖ of every matrix of a stack (…×m×n → …×1×1), in ≥ fp32."""
    return torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True, dtype=norm_dtype(t.dtype))


def column_dim(side: str) -> int:
    """The dimension that column-wise norms reduce over (eq. 11): the projected one.

    For a left projection R is r×n and each of its n columns matches a column of G; for a right
    projection R is m×r and each of its m rows matches a row of G. A two-sided projection has no
    such correspondence.
    """
    if side == "left":
        return 0
    if side == "right":
        return 1
    raise ValueError("column-wise scaling needs a one-sided projection (proj_type other than 'full')")


# On the CPU torch reduces over a strided dimension ~10× slower than over a contiguous one (145 vs
# 10 ms for twelve 768×2048 matrices on one thread): column norms over the rows are summed over blocks
# of this many rows there, contiguous reads and a cache-sized temporary (0: off). Other devices take
# one ``vector_norm``. The CPU path dispatches more ops (3 per block), none per matrix.
CPU_ROW_BLOCK = 64


def column_norms(t: torch.Tensor, side: str) -> torch.Tensor:
    """Norms of the columns (left projection: …×1×n) or rows (right: …×m×1) of every matrix, ≥ fp32."""
    dtype = norm_dtype(t.dtype)
    if column_dim(side) == 1:
        return torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=dtype)
    rows = t.shape[-2]
    if t.device.type != "cpu" or not CPU_ROW_BLOCK or rows <= CPU_ROW_BLOCK:
        return torch.linalg.vector_norm(t, dim=-2, keepdim=True, dtype=dtype)
    total = torch.zeros((*t.shape[:-2], 1, t.shape[-1]), dtype=dtype)
    for block in t.split(CPU_ROW_BLOCK, dim=-2):
        total += block.to(dtype).square().sum(dim=-2, keepdim=True)
    return total.sqrt_()
