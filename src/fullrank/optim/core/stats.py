"""The residual's statistics of a step (``record_residual_stats``): ‖S‖ before and after the limiter
and the share of matrices it scaled down, summed on the device (the step reads nothing)."""
from __future__ import annotations

import torch


class ResidualStats:
    """Sums over the projected matrices with a residual of one step."""

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (Σ‖S‖², Σ‖c·S‖², matrices limited)
        self.count = 0

    def add(self, residual_sq: torch.Tensor, factors: torch.Tensor | None) -> None:
        """A bucket's ‖S‖² per matrix before the limiter and its factors c (None: c = 1)."""
        limited = torch.zeros_like(residual_sq) if factors is None else (factors < 1).to(residual_sq.dtype)
        post = residual_sq if factors is None else residual_sq * factors.square()
        sums = torch.stack([residual_sq.sum(), post.sum(), limited.sum()])
        if self.sums is not None:
            sums = sums.to(self.sums.device) + self.sums
        self.sums = sums
        self.count += residual_sq.numel()

    def summary(self) -> dict | None:
        """``residual_norm`` (‖S‖ before the limiter, root of the sum of squares), ``limited_norm``
        (after it) and ``limited_fraction`` as 0-d device tensors; None without a residual."""
        if self.count == 0:
            return None
        pre_sq, post_sq, limited = self.sums.unbind(0)
        return dict(residual_norm=pre_sq.sqrt(), limited_norm=post_sq.sqrt(), limited_fraction=limited / self.count)
