"""Fitting P to the gradients of a refresh: the SVD backend's factors (or its refinement of the
previous basis), each matrix's rank (fixed, or AdaRankGrad's energy rank read with every other rank
of the step in one transfer), and the projections truncated to those ranks."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..base import host
from ..base.counters import STEP
from ..base.seeds import projection_seed
from ..units.projection import projection_side, truncated_projection
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT
from ..units.rank import energy_rank, is_adaptive, rank_bounds
from .buckets import Item, stack
from .plan import GroupPlan


class NewSubspace(NamedTuple):
    """A matrix's new projection: whole P and/or Q (the unused side None), or APOLLO's seed."""

    item: Item
    state: dict
    left: torch.Tensor | None
    right: torch.Tensor | None
    seed: int | None


def _generator(plan: GroupPlan, item: Item, state: dict, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(projection_seed(plan.values.seed, item.ordinal, state[STEP]))
    return generator


def _warm(plan: GroupPlan, states: list[dict], grads: torch.Tensor, side: str):
    """New (left, right) stacks by the backend's refinement of the stored bases."""
    backend = plan.units.svd
    left = right = None
    if side in ("left", "both"):
        left = backend.refine(grads, stack([s[PROJ_LEFT] for s in states]), "left", plan.values)
    if side in ("right", "both"):
        right = backend.refine(grads, stack([s[PROJ_RIGHT] for s in states]), "right", plan.values)
    return left, right


def factors(plan: GroupPlan, pairs, grads: torch.Tensor, geometry: tuple, warm_states, pending: list) -> list:
    """(item, state, (U or P, Vh or Q), rank spec) of whole gradients ``grads`` of one ``geometry``
    (shape, side, warm): the warm-started bases, or singular vectors at the top rank with the rank
    fixed or pending (an adaptive rank, appended to ``pending`` to be read with the others)."""
    shape, side, warm = geometry
    if warm:
        left, right = _warm(plan, warm_states, grads, side)
        return [(item, state, (None if left is None else left[b], None if right is None else right[b]), None)
                for b, (item, state) in enumerate(pairs)]
    low, high = rank_bounds(plan.values, shape)
    backend = plan.units.svd
    generators = ([_generator(plan, item, state, grads.device) for item, state in pairs]
                  if backend.uses_generators else None)
    U, singular, Vh = backend.factors(grads, high, plan.values, generators)
    U = U if side != "right" else None
    Vh = Vh if side != "left" else None
    if is_adaptive(plan.values):
        total = torch.linalg.vector_norm(grads, dim=(-2, -1), dtype=singular.dtype).square()
        pending.append((energy_rank(singular, total, plan.values.rank_energy, low, high), high))
        rank_of = ("pending", len(pending) - 1)
    else:
        rank_of = high
    return [(item, state, (None if U is None else U[b], None if Vh is None else Vh[b]), (rank_of, b))
            for b, (item, state) in enumerate(pairs)]


def resolve(plan: GroupPlan, factored: list, read: list) -> list[NewSubspace]:
    """The projections truncated to their ranks, in the gradient's dtype."""
    out = []
    for item, state, projection, rank in factored:
        dtype = item.grad.dtype
        if rank is not None:
            rank_of, b = rank
            r = read[rank_of[1]][b] if isinstance(rank_of, tuple) else rank_of
            side = projection_side(plan.values.proj_type, item.full_shape)
            left, right = truncated_projection(*projection, r, side, dtype)
        else:
            left, right = (None if t is None else t.to(dtype, copy=True).contiguous() for t in projection)
        out.append(NewSubspace(item, state, left, right, None))
    return out


def read_ranks(pending: list[tuple[torch.Tensor, int]]) -> list[list[int]]:
    """All adaptive ranks of the step, read in one transfer per device; ``pending`` holds (ranks on
    the device, their max_rank: what a fake tensor reads as, ``base/host.py``)."""
    if not pending:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for k, (ranks, _) in enumerate(pending):
        by_device.setdefault(ranks.device, []).append(k)
    read: list[list[int] | None] = [None] * len(pending)
    for device, indices in by_device.items():
        ranks = torch.cat([pending[k][0] for k in indices])
        values = host.read(ranks, [high for k in indices for high in [pending[k][1]] * pending[k][0].numel()])
        for k in indices:
            n = pending[k][0].numel()
            read[k], values = values[:n], values[n:]
    return read
