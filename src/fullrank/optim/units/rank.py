"""Adaptive rank (AdaRankGrad) and the bookkeeping of each matrix's current rank.

AdaRankGrad (Refael et al., ICLR 2025) observes that the rank of layer gradients falls during
training, towards one, and picks the rank of each subspace from the gradient itself: the smallest
r whose truncation keeps a fraction η (the paper's information threshold η_th) of the gradient's
energy,

    r(G) = min { r : ‖G_r‖²_F ≥ η·‖G‖²_F },      ‖G_r‖²_F = σ_1² + … + σ_r²   (Eckart–Young)

bounded here by ``min_rank`` and ``max_rank``. With the randomized range finder the σ_i are the
singular values of the sketch Qᵀ·G, which never exceed G's own (Qᵀ·G is a projection of G), so the
rank read from the sketch is never smaller than the exact one and equals it once the sketch has
found the top subspace (spectral gap, power iterations).

A matrix's rank is not stored as a number: it is the low dimension of its moments' shape, which
the moment store keeps whatever the moments' precision (``moments.low_shape``), so the state holds
nothing the shapes do not already say, and reading it never touches the device.
"""
from __future__ import annotations

import statistics

import torch

from ..base.options import Option, OptionValues, integer, number, optional
from ..base.units import Unit, declare_policy


class RankPolicy(Unit):
    """Each matrix's rank: the group's, or AdaRankGrad's energy rank (no state: the rank is the
    moments' shape)."""

    name = "rank_policy"
    options = {
        "rank_energy": Option(None, optional(number(0.0, 1.0, low_open=True)),
                              "η in (0, 1]: AdaRankGrad's adaptive rank keeps η of ‖G‖²; None: the fixed rank"),
        "min_rank": Option(1, integer(1), "the adaptive rank's lower bound"),
        "max_rank": Option(None, optional(integer(1)), "the adaptive rank's upper bound (default: the group's rank)"),
    }


RANK_POLICY = declare_policy(RankPolicy())
OPTIONS = RANK_POLICY.options


def energy_rank(
    singular_values: torch.Tensor, total_energy: torch.Tensor, eta: float, min_rank: int, max_rank: int
) -> torch.Tensor:
    """Smallest r with σ_1² + … + σ_r² ≥ η·``total_energy``, clamped to [min_rank, max_rank].

    ``singular_values`` are in descending order (the top k of G, k ≥ max_rank or all of them);
    ``total_energy`` is ‖G‖²_F (batched: …×k values, … totals). Returns an int64 tensor (0-d for one matrix) on their device: no synchronisation here,
    the caller reads all ranks of a step at once. If the k values keep less than η of the energy
    (a sketch that is too narrow), the rank is ``max_rank``.
    """
    energy = singular_values.square().cumsum(-1)
    below = (energy < eta * total_energy.unsqueeze(-1)).sum(-1)
    return (below + 1).clamp(min_rank, max_rank)


def low_rank_dim(side: str) -> int:
    """The dimension of the moments that holds the rank: rows for left/two-sided, columns for right."""
    return 1 if side == "right" else 0


def current_rank(low_shape: tuple | None, side: str) -> int | None:
    """The rank of moments of shape ``low_shape`` (``moments.low_shape``), None before a first step."""
    return None if low_shape is None else int(low_shape[low_rank_dim(side)])


def summarize(ranks: dict[str, int]) -> dict:
    """``dict(min=, median=, max=, mean=, ranks={name: r})``; the statistics are None when empty."""
    values = list(ranks.values())
    if not values:
        return dict(min=None, median=None, max=None, mean=None, ranks={})
    return dict(
        min=min(values),
        median=statistics.median(values),
        max=max(values),
        mean=statistics.fmean(values),
        ranks=dict(ranks),
    )


def is_adaptive(values: OptionValues) -> bool:
    """The group chooses each matrix's rank from its gradient (``rank_energy`` η is set)."""
    return values.rank_energy is not None


def max_rank_of(values: OptionValues) -> int:
    """The group's ``max_rank``; by default its ``rank`` (the optimizer-state budget)."""
    return values.rank if values.max_rank is None else values.max_rank


def rank_bounds(values: OptionValues, shape: tuple[int, int]) -> tuple[int, int]:
    """The ranks a matrix of ``shape`` may have in the group: [rank, rank], or
    [min_rank, min(max_rank, m, n)] for an adaptive group."""
    if not is_adaptive(values):
        return values.rank, values.rank
    return values.min_rank, min(max_rank_of(values), *shape)
