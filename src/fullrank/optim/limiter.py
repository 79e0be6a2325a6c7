"""Limiters on the scaled residual S, returning the factor c that S is multiplied by.

* ``none``         c = 1.
* ``norm_growth``  Fira's norm-growth limiter (paper eq. 12): if ‖S_t‖ / ‖S_{t−1}‖ > γ then
                   S_t ← S_t · γ‖S_{t−1}‖ / ‖S_t‖, so the ratio is exactly γ; ‖S_{t−1}‖ is the norm
                   *after* limiting. The first step (no previous norm, or a previous norm of 0) is
                   left untouched.
* ``clip``         absolute norm clipping, the paper's "Fira-gradient-clipping" ablation:
                   S ← S · min(1, τ / ‖S‖).

Everything stays on the tensor's device (``torch.where``), so the step never synchronises.
"""
from __future__ import annotations

import torch

LIMITERS = ("none", "norm_growth", "clip")
STATE_KEY = "residual_norm"


def limit_factor(
    kind: str, norm: torch.Tensor, state: dict, *, gamma: float, clip_threshold: float
) -> torch.Tensor | None:
    """The factor c for ‖S‖ = ``norm`` (None means 1). Updates ``state[STATE_KEY]`` for norm_growth."""
    if kind == "none":
        return None
    if kind == "clip":
        return (clip_threshold / norm).clamp_(max=1.0)
    if kind == "norm_growth":
        previous = state[STATE_KEY]
        grows = (previous > 0) & (norm > gamma * previous)
        factor = torch.where(grows, gamma * previous / norm, torch.ones_like(norm))
        state[STATE_KEY] = norm * factor
        return factor
    raise ValueError(f"limiter must be one of {LIMITERS}, got {kind!r}")
