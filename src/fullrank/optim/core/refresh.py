"""The refresh stage of a step: which matrices get a new P, and the P each gets, batched over
matrices of equal shape (paper eq. 2). Nothing is written here: the new subspaces go to the writer
(``write.install_subspaces``), which installs P and carries the units' state over.

* **When** (``units/schedule.py``): every T steps (``update_proj_gap``), optionally staggered so that
  the group's matrices refresh on different steps (``refresh_stagger``), or when the captured energy
  says Adam has converged in the subspace (``refresh_threshold``, AdaRankGrad).
* **How**: the matrices due at a step are stacked per shape and refreshed by one call —
  ``svd="exact"`` (``torch.linalg.svd`` on the batch, GaLore's and the presets' default),
  ``"randomized"`` (Halko et al., one batched range finder, each matrix's Gaussian sketch drawn from
  its own seeded generator so that resumed and layer-wise runs draw the same numbers), ``"warm"``
  (subspace iteration from the previous P, ``units/svd.warm_subspace``; exact at a matrix's first
  refresh), or a random P (``projector="random"``, ``units/projectors.py``).
* **At which rank** (``units/rank.py``): fixed, or AdaRankGrad's energy rank, computed on the device
  for the whole batch and read with every other rank of the step in one transfer.
* **Sharded** (FSDP2, :func:`sharded_subspaces`): each due row-sharded matrix is gathered whole to one
  owner process, which runs the same refresh on it; every process keeps its rows of the new P.
"""
from __future__ import annotations

import torch

from ..base import shards
from ..units.moments import EXP_AVG, low_shape
from ..units.projection import projection_side
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT
from ..units.rank import is_adaptive, rank_bounds
from ..units.schedule import refresh_due, stagger_offset
from .buckets import Item, stack
from .fitting import NewSubspace, factors, read_ranks, resolve
from .plan import GroupPlan


def due_subspaces(plan: GroupPlan, items: list[Item], states, flagged: set[int], count: int) -> list[NewSubspace]:
    """The new subspace of every matrix of ``items`` that is due (``flagged``: ē < τ was read; ``count``:
    the group's number of parameters, for staggering)."""
    due = []
    for item in items:
        state = states[item.param]
        if refresh_due(plan.values, state, id(item.param) in flagged, stagger_offset(plan.values, item.index, count)):
            due.append((item, state))
    if not due:
        return []
    by_shape: dict[tuple, list] = {}
    for item, state in due:
        warm = plan.units.svd.warm_start and EXP_AVG in state
        key = (item.grad.device, item.grad.dtype, item.full_shape, warm,
               tuple(low_shape(state)) if warm else None, None if item.shard is None else id(item.shard.group))
        by_shape.setdefault(key, []).append((item, state))
    factored, pending_ranks, resolved = [], [], []
    for (_, _, shape, warm, _, _), pairs in by_shape.items():
        side = projection_side(plan.values.proj_type, shape)
        if not plan.units.projector.fitted:
            resolved.extend(NewSubspace(*drawn) for drawn in plan.units.projector.draw(plan.values, pairs, shape, side))
        elif pairs[0][0].shard is not None:
            resolved.extend(sharded_subspaces(plan, pairs, (shape, side, warm)))
        else:
            grads = stack([item.grad for item, _ in pairs])
            factored.extend(factors(plan, pairs, grads, (shape, side, warm), [s for _, s in pairs], pending_ranks))
    resolved.extend(resolve(plan, factored, read_ranks(pending_ranks)))
    return resolved


def sharded_subspaces(plan: GroupPlan, pairs: list, geometry: tuple) -> list[NewSubspace]:
    """The refresh of FSDP2 row-sharded matrices of one ``geometry`` (shape, side, warm;
    ``base/shards.py``), in rounds of w matrices (w ranks): in each round the matrices are dealt to
    the owner ranks, the first to rank ``ordinal % w`` (a layer-wise refresh of one matrix), and each
    is gathered whole to its owner; the owners run the unsharded refresh at the same time (the SVD work
    is split w ways), then each broadcasts its new P or Q (and the ranks). An owner holds one whole
    gradient at a time, not its share of the bucket. Returns the whole new bases on every rank."""
    shard = pairs[0][0].shard
    shards.BucketShard(shard, geometry[1])  # refuses what cannot be sharded, before any collective
    found: list = []
    for start in range(0, len(pairs), shard.world):
        found.extend(_sharded_round(plan, pairs[start:start + shard.world], geometry))
    return found


def _sharded_round(plan: GroupPlan, pairs: list, geometry: tuple) -> list[NewSubspace]:
    """One round of :func:`sharded_subspaces`: at most one matrix per owner rank."""
    shape, side, warm = geometry
    shard = pairs[0][0].shard
    grads = stack([item.grad for item, _ in pairs])
    first = pairs[0][0].ordinal % shard.world
    dealt = [(owner, positions) for owner, positions in enumerate(shards.deal(len(pairs), shard.world, first))
             if positions]
    whole = old = None
    for owner, positions in dealt:  # 1. the gradients (a warm left refresh: and the previous P) to their owners
        gathered = shards.gather_rows(grads[positions], shard, owner)
        if warm and side == "left":
            previous = shards.gather_rows(stack([pairs[p][1][PROJ_LEFT] for p in positions]), shard, owner)
            old = previous if owner == shard.rank else old
        whole = gathered if owner == shard.rank else whole
    high = _current_rank(pairs[0][1], side) if warm else rank_bounds(plan.values, shape)[1]
    buffers = {owner: _refresh_owned(plan, [pairs[p] for p in positions], (whole, old, shard.rank == owner),
                                     geometry, high) for owner, positions in dealt}
    out: list = [None] * len(pairs)
    for owner, positions in dealt:  # 3. every owner's bases (and ranks) to every rank
        ranks, stacked = buffers[owner]
        out_ranks = [high] * len(positions)
        if is_adaptive(plan.values) and not warm:
            out_ranks = shards.broadcast(ranks, shard, owner).tolist()
        shards.broadcast(stacked, shard, owner)
        for b, (position, rank) in enumerate(zip(positions, out_ranks)):
            item, state = pairs[position]
            projection = (stacked[b, :, :rank] if side == "left" else stacked[b, :rank, :]).contiguous()
            out[position] = NewSubspace(item, state, projection if side == "left" else None,
                                        projection if side == "right" else None, None)
    return out


def _refresh_owned(plan: GroupPlan, mine: list, gathered: tuple, geometry: tuple, high: int):
    """2. (ranks, bases padded to ``high``) of one owner's matrices: computed by the owner from the
    whole gradients (and previous P) it gathered, zeros to be overwritten by the broadcast elsewhere."""
    (m, n), side, warm = geometry
    whole, old, owned = gathered
    device, dtype = mine[0][0].grad.device, mine[0][0].grad.dtype
    ranks = torch.full((len(mine),), high, dtype=torch.int64, device=device)
    stacked = torch.zeros((len(mine), *((m, high) if side == "left" else (high, n))), dtype=dtype, device=device)
    if owned:
        warm_states = ([{PROJ_LEFT: old[b]} for b in range(len(mine))] if warm and side == "left"
                       else [s for _, s in mine])
        pending: list = []
        found = resolve(plan, factors(plan, mine, whole, geometry, warm_states, pending), read_ranks(pending))
        for b, new in enumerate(found):
            projection = new.left if side == "left" else new.right
            ranks[b] = projection.shape[-1] if side == "left" else projection.shape[0]
            stacked[b, :projection.shape[0], :projection.shape[1]] = projection
    return ranks, stacked


def _current_rank(state: dict, side: str) -> int:
    return state[PROJ_LEFT].shape[1] if side == "left" else state[PROJ_RIGHT].shape[0]
