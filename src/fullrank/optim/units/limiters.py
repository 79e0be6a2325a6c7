"""Limiters on the scaled residual S: each maps a vector of norms ‖S‖ (one per matrix of a bucket),
and the state it keeps per matrix, to the factors c that S is multiplied by and its new state.

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

A limiter is a unit (``base/units.py``: ``name``, declared ``options`` and ``state``) with
``limit(norms, state, values) -> (c or None, new state)`` over 1-D tensors on the device
(``torch.where``, never a host synchronisation); ``state`` holds its declared keys stacked over the
bucket (B values each), and the engine writes the new values back. A limiter without state may
define ``factors(norms, previous, values) -> (c or None, None)`` instead. Norm-growth and gradient
shrink keep the limited norm ‖S_{t−1}‖ (:class:`KeptNormLimiter`), which a new subspace resets when
``reset_limiter_on_switch`` is set. To add one: write its class (in its own file if you like), then
``register_limiter("name", MyLimiter())``.
"""
from __future__ import annotations

import torch

from ..base.options import Option, OptionValues, number
from ..base.units import Registry, Unit, scalar_state

LIMITER_ALPHA = Option(0.5, number(0.0, 1.0, low_open=True), "a of gradient_shrink and tensor_scaling (Table r10)")


class Limiter(Unit):
    """Base class: ``c = 1``, nothing kept."""

    name = "none"

    def limit(self, norms: torch.Tensor, state: dict[str, torch.Tensor], values: OptionValues):
        """(c per matrix or None, the new value of each declared state key)."""
        factor, _ = self.factors(norms, None, values)
        return factor, {}

    def factors(self, norms: torch.Tensor, previous: torch.Tensor | None, values: OptionValues):
        return None, None


class KeptNormLimiter(Limiter):
    """A limiter that keeps each matrix's limited norm ‖S_{t−1}‖ (0 before its first step):
    ``factors(norms, previous, values) -> (c, the norms to keep)``."""

    KEPT_NORM = "residual_norm"  # 0-d, ≥ fp32
    state = {KEPT_NORM: scalar_state}

    def limit(self, norms, state, values):
        previous = state[self.KEPT_NORM]
        factor, kept = self.factors(norms, previous if previous.dtype == norms.dtype else previous.to(norms.dtype),
                                    values)
        return factor, {self.KEPT_NORM: kept}

    def at_switch(self, state, values):
        if values.reset_limiter_on_switch:  # the kept norm starts over at 0 (made anew by the next step)
            state.pop(self.KEPT_NORM, None)


class NormGrowth(KeptNormLimiter):
    """Eq. 12: the ratio ‖S_t‖/‖S_{t−1}‖ is capped at γ."""

    name = "norm_growth"
    options = {"gamma": Option(1.01, number(1.0), "γ ≥ 1 of the norm-growth limiter (eq. 12)")}

    def factors(self, norms, previous, values):
        # γ‖S_{t−1}‖/‖S_t‖ < 1 exactly when the norm grew by more than γ (and ‖S_t‖ = 0 gives inf → 1)
        ratio = (values.gamma * previous / norms).clamp_max_(1.0)
        factor = torch.where(previous > 0, ratio, 1.0)
        return factor, norms * factor


class Clip(Limiter):
    """S ← S·min(1, τ/‖S‖)."""

    name = "clip"
    options = {"clip_threshold": Option(1.0, number(0.0, low_open=True), "τ > 0 of absolute norm clipping")}

    def factors(self, norms, previous, values):
        return (values.clip_threshold / norms).clamp_(max=1.0), None


class GradientShrink(KeptNormLimiter):
    """‖S_t‖ ← a·‖S_t‖ + (1 − a)·‖S_{t−1}‖ (rebuttal Table r10)."""

    name = "gradient_shrink"
    options = {"limiter_alpha": LIMITER_ALPHA}

    def factors(self, norms, previous, values):
        a = values.limiter_alpha
        target = a * norms + (1.0 - a) * previous
        factor = torch.where((previous > 0) & (norms > 0), target / norms, 1.0)
        return factor, norms * factor


class TensorScaling(Limiter):
    """S_t ← a·S_t (rebuttal Table r10)."""

    name = "tensor_scaling"
    options = {"limiter_alpha": LIMITER_ALPHA}

    def factors(self, norms, previous, values):
        return torch.full_like(norms, values.limiter_alpha), None


LIMITER_REGISTRY = Registry("limiter", "limiter", Limiter)


def register_limiter(name: str, limiter: Limiter) -> None:
    """Make ``limiter`` available as ``limiter=name`` in every group (``name`` becomes its name)."""
    if not isinstance(limiter, Limiter):
        raise TypeError(f"limiter {name!r} must be a fullrank.optim.units.limiters.Limiter, got {type(limiter).__name__}")
    limiter.name = name
    LIMITER_REGISTRY.register(limiter)


for _limiter in (Limiter(), NormGrowth(), Clip(), GradientShrink(), TensorScaling()):
    LIMITER_REGISTRY.register(_limiter)


def get_limiter(name: str) -> Limiter:
    return LIMITER_REGISTRY.get(name)
