"""Limiters on the scaled residual S: each maps a vector of norms ‖S‖ (one per matrix of a bucket)
and the norms it kept from the previous step to the factors c that S is multiplied by.

* ``none``             c = 1.
* ``norm_growth``      Fira's norm-growth limiter (paper eq. 12): if ‖S_t‖ / ‖S_{t−1}‖ > γ then
                       S_t ← S_t · γ‖S_{t−1}‖ / ‖S_t‖, so the ratio is exactly γ; ‖S_{t−1}‖ is the norm
                       *after* limiting. The first step (no previous norm, or a previous norm of 0)
                       is left untouched.
* ``clip``             absolute norm clipping, the paper's "Fira-gradient-clipping" ablation:
                       S ← S · min(1, τ / ‖S‖)  (τ = ``clip_threshold``).
* ``gradient_shrink``  the rebuttal's gradient shrink (Table r10): ‖S_t‖ ← a·‖S_t‖ + (1 − a)·‖S_{t−1}‖
                       (a = ``limiter_alpha``), S_t rescaled to that norm; the first step untouched.
* ``tensor_scaling``   the rebuttal's tensor-wise scaling (Table r10): S_t ← a·S_t, a constant
                       (a = ``limiter_alpha``).

A limiter is a small object with ``factors(norms, previous, options) -> (c or None, kept or None)``
over 1-D tensors on the device (``torch.where``, never a host synchronisation). ``kept`` is what the
engine stores as each matrix's ``residual_norm`` for the next step (None: the limiter keeps nothing).
To add one: write its class (in its own file if you like), then ``register_limiter("name", Limiter())``.
"""
from __future__ import annotations

import torch

from .state import RESIDUAL_NORM


class Limiter:
    """Base class: ``c = 1``, nothing kept."""

    def factors(self, norms: torch.Tensor, previous: torch.Tensor, options: dict):
        return None, None


class NormGrowth(Limiter):
    """Eq. 12: the ratio ‖S_t‖/‖S_{t−1}‖ is capped at γ."""

    def factors(self, norms, previous, options):
        # γ‖S_{t−1}‖/‖S_t‖ < 1 exactly when the norm grew by more than γ (and ‖S_t‖ = 0 gives inf → 1)
        ratio = (options["gamma"] * previous / norms).clamp_max_(1.0)
        factor = torch.where(previous > 0, ratio, 1.0)
        return factor, norms * factor


class Clip(Limiter):
    """S ← S·min(1, τ/‖S‖)."""

    def factors(self, norms, previous, options):
        return (options["clip_threshold"] / norms).clamp_(max=1.0), None


class GradientShrink(Limiter):
    """‖S_t‖ ← a·‖S_t‖ + (1 − a)·‖S_{t−1}‖ (rebuttal Table r10)."""

    def factors(self, norms, previous, options):
        a = options["limiter_alpha"]
        target = a * norms + (1.0 - a) * previous
        factor = torch.where((previous > 0) & (norms > 0), target / norms, 1.0)
        return factor, norms * factor


class TensorScaling(Limiter):
    """S_t ← a·S_t (rebuttal Table r10)."""

    def factors(self, norms, previous, options):
        return torch.full_like(norms, options["limiter_alpha"]), None


LIMITER_REGISTRY: dict[str, Limiter] = {
    "none": Limiter(),
    "norm_growth": NormGrowth(),
    "clip": Clip(),
    "gradient_shrink": GradientShrink(),
    "tensor_scaling": TensorScaling(),
}
LIMITERS = tuple(LIMITER_REGISTRY)  # the built-in names (validation reads the registry itself)


def register_limiter(name: str, limiter: Limiter) -> None:
    """Make ``limiter`` available as ``limiter=name`` in every group."""
    if not isinstance(limiter, Limiter):
        raise TypeError(f"limiter {name!r} must be a fullrank.optim.limiter.Limiter, got {type(limiter).__name__}")
    LIMITER_REGISTRY[name] = limiter


def get_limiter(name: str) -> Limiter:
    if name not in LIMITER_REGISTRY:
        raise ValueError(f"limiter must be one of {tuple(LIMITER_REGISTRY)}, got {name!r}")
    return LIMITER_REGISTRY[name]


def limit_factor(
    kind: str, norm: torch.Tensor, state: dict, *, gamma: float, clip_threshold: float, limiter_alpha: float = 0.5
) -> torch.Tensor | None:
    """One matrix's factor c for ‖S‖ = ``norm`` (None means 1); updates ``state[RESIDUAL_NORM]``."""
    group = dict(gamma=gamma, clip_threshold=clip_threshold, limiter_alpha=limiter_alpha)
    previous = state.get(RESIDUAL_NORM, torch.zeros_like(norm)).reshape(1)
    factor, kept = get_limiter(kind).factors(norm.reshape(1), previous, group)
    if kept is not None:
        state[RESIDUAL_NORM] = kept.reshape(())
    return None if factor is None else factor.reshape(())
