"""When a matrix's subspace is recomputed: every T steps, or when optimisation inside it has converged.

GaLore and Fira refresh P at a fixed gap T. AdaRankGrad (Refael et al., ICLR 2025) instead moves
to a new subspace once Adam has converged inside the current one, keeping T as an upper bound.
The test used here (``refresh_threshold`` τ > 0) is on the *captured energy* of the gradient,

    e_t = ‖Pᵀ·G_t‖²_F / ‖G_t‖²_F                     (R_t = Pᵀ·G_t, orthonormal P: e_t ∈ [0, 1])
    ē_t = β·ē_{t−1} + (1 − β)·e_t,   ē_s = e_s at the refresh step s           (β = ``refresh_beta``)
    refresh at step t + 1  when  ē_t < τ   or   t + 1 − s ≥ T

Why this test:

* It measures convergence in the subspace directly: while Adam descends inside span(P) the part
  of the gradient in that span shrinks, the part outside it does not, so e_t falls; once the
  subspace holds less than τ of the gradient, the steps inside it have little left to do.
* It is scale-free. An absolute test ‖Pᵀ·G‖ < ε (the projected-gradient norm) needs a different ε
  for every layer and every phase of training, as gradient norms span orders of magnitude; a
  fraction has one meaning everywhere and is comparable with η: with an adaptive rank the subspace
  holds e_s ≥ η of the gradient it was computed from, so τ < η, and with ē starting at e_s a
  triggered refresh comes at least k + 1 steps after the previous one, k the smallest integer with
  β^k·η < τ (k = 6, a gap of 7 steps, for τ = 0.5, η = 0.9, β = 0.9).
* The moving average is the window: a minibatch gradient is noisy, and a single step's e_t would
  trigger on one bad batch. β = 0.9 averages over about ten steps, like Adam's first moment.

It costs one norm of G and one of R per matrix and step, all on the device. The comparison ē < τ
is read on the next step together with the non-finite check, in the step's one synchronisation,
so the decision lags one step: the refresh at t + 1 uses the gradient G_{t+1}, like every refresh.
A zero gradient counts as fully captured (e = 1). The test needs a subspace that is fitted to the
gradient (``projector="svd"``): a random one captures a fraction fixed by its dimensions, not by
convergence.
"""
from __future__ import annotations

import torch

from ..base.counters import STEP
from ..base.options import Option, OptionValues, flag, number
from ..base.units import Unit, declare_policy
from .moments import EXP_AVG

CAPTURED_ENERGY = "captured_energy"  # ē, 0-d, ≥ fp32: the trigger's moving average of ‖R‖²/‖G‖²
LAST_REFRESH = "last_refresh"  # int: the step of the matrix's last refresh (the trigger's schedule)


class RefreshSchedule(Unit):
    """The schedule of every projected matrix's refreshes, and the convergence trigger's state: ē,
    which starts over at each new subspace, and the step of the last refresh."""

    name = "refresh_schedule"
    options = {
        "refresh_threshold": Option(0.0, number(0.0, 1.0, high_open=True),
                                    "τ in [0, 1): also refresh once ē < τ (captured energy); 0: off"),
        "refresh_beta": Option(0.9, number(0.0, 1.0, high_open=True), "β of the captured energy's moving average"),
        "refresh_stagger": Option(False, flag, "spread the group's refreshes evenly over the T steps"),
    }
    state = {CAPTURED_ENERGY: None}  # (made by the first measurement, not by a factory)

    def at_switch(self, state: dict, values: OptionValues) -> None:
        """ē starts over at the new subspace's first measurement; the trigger counts T from this step."""
        if uses_trigger(values):
            state.pop(CAPTURED_ENERGY, None)
            state[LAST_REFRESH] = state[STEP]


SCHEDULE = declare_policy(RefreshSchedule())
OPTIONS = SCHEDULE.options


def uses_trigger(values: OptionValues) -> bool:
    """The convergence trigger is on (τ > 0)."""
    return values.refresh_threshold > 0


def stagger_offset(values: OptionValues, index: int, count: int) -> int:
    """The step offset of the ``index``-th of a group's ``count`` matrices under ``refresh_stagger``:
    the group's matrices are spread evenly over the T steps, so no single step pays every SVD (0 when
    off)."""
    if not values.refresh_stagger:
        return 0
    return (index * values.update_proj_gap) // max(1, count)


def refresh_due(values: OptionValues, state: dict, flagged: bool, offset: int = 0) -> bool:
    """Whether the matrix with ``state`` gets a new subspace at this step (``flagged``: ē < τ was read;
    ``offset``: its :func:`stagger_offset`). Every matrix gets its first subspace at its first step."""
    if EXP_AVG not in state:
        return True
    last = state.get(LAST_REFRESH)
    if uses_trigger(values) and last is not None:
        return flagged or state[STEP] - last >= values.update_proj_gap
    return flagged or (state[STEP] - offset) % values.update_proj_gap == 0


def refresh_possible(values: OptionValues, state: dict, low: int, high: int, offset: int = 0) -> bool:
    """Whether :func:`refresh_due` can hold at a step count in [``low``, ``high``] (the fixed schedule;
    ``capturable=True`` knows a matrix's count only within these bounds without reading the device)."""
    if EXP_AVG not in state:
        return True
    gap = values.update_proj_gap
    return (high - offset) // gap > (low - 1 - offset) // gap


def converged_flag(values: OptionValues, state: dict) -> torch.Tensor | None:
    """0-d bool ``ē < τ`` on the device, or None when the trigger is off or has no average yet."""
    energy = state.get(CAPTURED_ENERGY)
    if energy is None or not uses_trigger(values):
        return None
    return energy.lt(values.refresh_threshold)


def stacked_energy(low_norms: torch.Tensor, grad_norms: torch.Tensor) -> torch.Tensor:
    """e_b = ‖R_b‖²/‖G_b‖² from the vectors of norms ‖R_b‖ and ‖G_b‖ (≥ fp32); 1 for a zero gradient."""
    ratio = low_norms.div(grad_norms).square_()
    return torch.where(grad_norms > 0, ratio, 1.0).clamp_max_(1.0)


def record_energy_(state: dict, energy: torch.Tensor, beta: float) -> None:
    """ē ← e at a new subspace (no average yet), else ē ← β·ē + (1 − β)·e, in place."""
    if CAPTURED_ENERGY not in state:
        state[CAPTURED_ENERGY] = energy
    else:
        state[CAPTURED_ENERGY].lerp_(energy, 1.0 - beta)
