"""The subspace policy: when each matrix gets a new P and how, batched over matrices of equal shape.

* **When** (``refresh.py``): every T steps (``update_proj_gap``), optionally staggered so that the
  group's matrices refresh on different steps (``refresh_stagger``), or when the captured energy
  says Adam has converged in the subspace (``refresh_threshold``, AdaRankGrad).
* **How**: the matrices due at a step are stacked per shape and refreshed by one call —
  ``svd="exact"`` (``torch.linalg.svd`` on the batch, GaLore's and the presets' default),
  ``"randomized"`` (Halko et al., one batched range finder, each matrix's Gaussian sketch drawn from
  its own seeded generator so that resumed and layer-wise runs draw the same numbers), ``"warm"``
  (subspace iteration from the previous P, ``svd.warm_subspace``; exact at a matrix's first
  refresh), or a random P (``projector="random"``, ``random_proj.py``).
* **At which rank** (``rank.py``): fixed, or AdaRankGrad's energy rank, computed on the device for
  the whole batch and read with every other rank of the step in one transfer.
* **What the moments do** (``switch.py``): keep, re-project or reset (``on_switch``), and the
  limiter's norm is optionally forgotten (``reset_limiter_on_switch``).

* **Sharded** (FSDP2, ``sharding.py``): each due row-sharded matrix is gathered whole to one owner
  process, which runs the same refresh on it; every process keeps its rows of the new P.

It also gives the bucket step its stacked projections (``stacked_projection``), regenerating
APOLLO's seed-only Gaussian P in place.
"""
from __future__ import annotations

import math

import torch

from . import host, moments, random_proj, sharding
from . import state as S
from .projector import low_rank_shape, projection_side, truncated_projection
from .random_proj import gaussian_projection
from .rank import energy_rank, is_adaptive, rank_bounds
from .refresh import refresh_due, stagger_offset, uses_trigger
from .projectors import PROJECTOR_REGISTRY
from .svd import SVD_REGISTRY
from .switch import switch_moments_


def _generator(group: dict, item, state: dict, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(random_proj.projection_seed(group["seed"], item.ordinal, state[S.STEP]))
    return generator


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _svd_factors(group: dict, members, states, grads: torch.Tensor, rank: int):
    """(U, S, Vh) of a stack of gradients at ``rank`` by the group's backend (``svd.SVD_REGISTRY``)."""
    backend = SVD_REGISTRY.get(group["svd"])
    generators = ([_generator(group, item, state, grads.device) for item, state in zip(members, states)]
                  if backend.uses_generators else None)
    return backend.factors(grads, rank, group, generators)


def _warm(group: dict, states, grads: torch.Tensor, side: str):
    """New (left, right) stacks by the backend's refinement of the stored bases."""
    backend = SVD_REGISTRY.get(group["svd"])
    left = right = None
    if side in ("left", "both"):
        left = backend.refine(grads, _stack([s[S.PROJ_LEFT] for s in states]), "left", group)
    if side in ("right", "both"):
        right = backend.refine(grads, _stack([s[S.PROJ_RIGHT] for s in states]), "right", group)
    return left, right


def refresh_(optimizer, group: dict, items, flagged: set[int]) -> set[int]:
    """Give every matrix of ``items`` that is due a new subspace; returns the refreshed parameter ids."""
    due = []
    for item in items:
        state = optimizer.state[item.param]
        if refresh_due(group, state, id(item.param) in flagged, stagger_offset(group, item.index)):
            due.append((item, state))
    if not due:
        return set()
    by_shape: dict[tuple, list] = {}
    for item, state in due:
        warm = SVD_REGISTRY.get(group["svd"]).warm_start and S.EXP_AVG in state
        key = (item.grad.device, item.grad.dtype, item.full_shape, warm,
               tuple(moments.low_shape(state)) if warm else None, None if item.shard is None else id(item.shard.group))
        by_shape.setdefault(key, []).append((item, state))
    installs, pending_ranks, resolved = [], [], []
    for (_, _, shape, warm, _, _), pairs in by_shape.items():
        side = projection_side(group["proj_type"], shape)
        projector = PROJECTOR_REGISTRY.get(group["projector"])
        if not projector.fitted:
            resolved.extend(projector.draw(group, pairs, shape, side))
        elif pairs[0][0].shard is not None:
            resolved.extend(_sharded_projections(group, pairs, shape, side, warm))
        else:
            grads = _stack([item.grad for item, _ in pairs])
            installs.extend(_factors(group, pairs, grads, shape, side, warm, [s for _, s in pairs], pending_ranks))
    resolved.extend(_resolve(group, installs, _read_ranks(pending_ranks)))
    for item, state, left, right, seed in resolved:
        _install(group, state, item, left, right, seed)
    return {id(item.param) for item, _ in due}


def _factors(group: dict, pairs, grads: torch.Tensor, shape, side: str, warm: bool, warm_states, pending: list):
    """(item, state, (U or P, Vh or Q), rank spec) of whole gradients ``grads`` of one shape: the
    warm-started bases, or singular vectors at the top rank with the rank fixed or pending (an
    adaptive rank, appended to ``pending`` to be read with the others)."""
    if warm:
        left, right = _warm(group, warm_states, grads, side)
        return [(item, state, (None if left is None else left[b], None if right is None else right[b]), None)
                for b, (item, state) in enumerate(pairs)]
    low, high = rank_bounds(group, shape)
    U, singular, Vh = _svd_factors(group, [p[0] for p in pairs], [p[1] for p in pairs], grads, high)
    U = U if side != "right" else None
    Vh = Vh if side != "left" else None
    if is_adaptive(group):
        total = torch.linalg.vector_norm(grads, dim=(-2, -1), dtype=singular.dtype).square()
        pending.append((energy_rank(singular, total, group["rank_energy"], low, high), high))
        rank_of = ("pending", len(pending) - 1)
    else:
        rank_of = high
    return [(item, state, (None if U is None else U[b], None if Vh is None else Vh[b]), (rank_of, b))
            for b, (item, state) in enumerate(pairs)]


def _resolve(group: dict, installs, read) -> list:
    """(item, state, left, right, None): the projections truncated to their ranks, in the gradient's dtype."""
    out = []
    for item, state, projection, rank in installs:
        dtype = item.grad.dtype
        if rank is not None:
            rank_of, b = rank
            r = read[rank_of[1]][b] if isinstance(rank_of, tuple) else rank_of
            left, right = truncated_projection(*projection, r, projection_side(group["proj_type"], item.full_shape), dtype)
        else:
            left, right = (None if t is None else t.to(dtype, copy=True).contiguous() for t in projection)
        out.append((item, state, left, right, None))
    return out


def _sharded_projections(group: dict, pairs, shape, side: str, warm: bool) -> list:
    """The refresh of FSDP2 row-sharded matrices (``sharding.py``): the due matrices are dealt
    round-robin to owner ranks and each is gathered whole to its owner; the owners run the unsharded
    refresh on their matrices at the same time (the SVD work is split w ways), then each broadcasts
    its new P or Q (and the ranks). An owner holds its share of the due gradients whole meanwhile.
    Returns (item, state, whole left, whole right, None) on every rank."""
    shard = pairs[0][0].shard
    sharding.BucketShard(shard, side)  # refuses what cannot be sharded, before any collective
    grads = _stack([item.grad for item, _ in pairs])
    m, n = shape
    dealt = [(owner, positions) for owner, positions in enumerate(sharding.deal(len(pairs), shard.world)) if positions]
    whole = old = None
    for owner, positions in dealt:  # 1. the gradients (a warm left refresh: and the previous P) to their owners
        gathered = sharding.gather_rows(grads[positions], shard, owner)
        if warm and side == "left":
            previous = sharding.gather_rows(_stack([pairs[p][1][S.PROJ_LEFT] for p in positions]), shard, owner)
            old = previous if owner == shard.rank else old
        whole = gathered if owner == shard.rank else whole
    high = _current_rank(pairs[0][1], side) if warm else rank_bounds(group, shape)[1]
    buffers = {}
    for owner, positions in dealt:  # 2. each owner refreshes its own matrices, while the others do theirs
        mine = [pairs[p] for p in positions]
        ranks = torch.full((len(mine),), high, dtype=torch.int64, device=grads.device)
        stacked = torch.zeros((len(mine), *((m, high) if side == "left" else (high, n))), dtype=grads.dtype,
                              device=grads.device)
        buffers[owner] = ranks, stacked
        if owner == shard.rank:
            warm_states = ([{S.PROJ_LEFT: old[b]} for b in range(len(mine))] if warm and side == "left"
                           else [s for _, s in mine])
            pending: list = []
            found = _resolve(group, _factors(group, mine, whole, shape, side, warm, warm_states, pending),
                             _read_ranks(pending))
            for b, (_, _, left, right, _) in enumerate(found):
                projection = left if side == "left" else right
                ranks[b] = projection.shape[-1] if side == "left" else projection.shape[0]
                stacked[b, :projection.shape[0], :projection.shape[1]] = projection
    out: list = [None] * len(pairs)
    for owner, positions in dealt:  # 3. every owner's bases (and ranks) to every rank
        ranks, stacked = buffers[owner]
        out_ranks = [high] * len(positions)
        if is_adaptive(group) and not warm:
            out_ranks = sharding.broadcast(ranks, shard, owner).tolist()
        sharding.broadcast(stacked, shard, owner)
        for b, (position, rank) in enumerate(zip(positions, out_ranks)):
            item, state = pairs[position]
            projection = (stacked[b, :, :rank] if side == "left" else stacked[b, :rank, :]).contiguous()
            out[position] = (item, state, projection if side == "left" else None,
                             projection if side == "right" else None, None)
    return out


def _current_rank(state: dict, side: str) -> int:
    return (state[S.PROJ_LEFT].shape[1] if side == "left" else state[S.PROJ_RIGHT].shape[0])


def _read_ranks(pending: list[tuple[torch.Tensor, int]]) -> list[list[int]]:
    """All adaptive ranks of the step, read in one transfer per device; ``pending`` holds (ranks on
    the device, their max_rank: what a fake tensor reads as, ``host.py``)."""
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


def _install(group: dict, state: dict, item, left, right, seed) -> None:
    """Write the new projection (whole ``left``/``right``) into the state and carry the moments over
    (``on_switch``); a sharded rank keeps its rows of P and its share of the moments."""
    shape = item.full_shape
    side = projection_side(group["proj_type"], shape)
    if seed is not None:
        m, n = shape
        r = group["rank"]
        low_shape = torch.Size((r if side in ("left", "both") else m, r if side in ("right", "both") else n))
    else:
        low_shape = low_rank_shape(shape, left, right)
    rotations = None
    shard = item.shard
    if shard is not None:
        if side == "left":
            low_shape = torch.Size((low_shape[0], sharding.chunk_span(shape[1], shard.world, shard.rank)[1]))
            if left is not None:
                left = sharding.local_rows(left, shard)
                old = state.get(S.PROJ_LEFT)
                if group["on_switch"] in ("reproject", "ldadam") and old is not None:  # P_newᵀ·P_old = Σ_k over rows
                    rotations = (sharding.all_reduce_(left.T @ old, shard.group), None)
        else:
            low_shape = torch.Size((shard.rows, low_shape[1]))
    store = moments.get_store(group["states"])
    if S.EXP_AVG not in state:
        store.zeros(state, low_shape, item.grad)
    else:
        switch_moments_(state, group["on_switch"], left, right, low_shape, rotations, store, item.grad,
                        group["betas"])
        if group["reset_limiter_on_switch"]:
            state[S.RESIDUAL_NORM] = torch.zeros_like(state[S.RESIDUAL_NORM])
    for key, value in ((S.PROJ_LEFT, left), (S.PROJ_RIGHT, right), (S.PROJ_SEED, seed)):
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    if uses_trigger(group):
        state[S.LAST_REFRESH] = state[S.STEP]


def stacked_projection(group: dict, plan, members, states, side: str):
    """(left, right) stacks of the bucket's projections (None for an unused side); APOLLO's Gaussian P
    regenerated from each matrix's seed into one buffer."""
    if not plan.seed_only:
        left = _stack([s[S.PROJ_LEFT] for s in states]) if side in ("left", "both") else None
        right = _stack([s[S.PROJ_RIGHT] for s in states]) if side in ("right", "both") else None
        return left, right
    shape = members[0].full_shape
    shard = members[0].shard
    if len(members) == 1:
        left, right = gaussian_projection(shape, side, group["rank"], states[0][S.PROJ_SEED],
                                          members[0].grad.device, members[0].grad.dtype)
        if shard is not None and left is not None:
            left = sharding.local_rows(left, shard)
        return (None if left is None else left.unsqueeze(0)), (None if right is None else right.unsqueeze(0))
    m, n = shape
    r = group["rank"]
    device, dtype = members[0].grad.device, members[0].grad.dtype
    sizes = [size for use, size in ((side in ("left", "both"), (m, r)), (side in ("right", "both"), (r, n))) if use]
    buffers = [torch.empty((len(members), *size), dtype=torch.float32, device=device) for size in sizes]
    for b, state in enumerate(states):  # the only per-matrix op of a steady step: APOLLO's draw
        generator = torch.Generator(device=device).manual_seed(state[S.PROJ_SEED])
        for size, buffer in zip(sizes, buffers):  # left first, as gaussian_projection draws
            torch.randn(size, generator=generator, device=device, dtype=torch.float32, out=buffer[b])
    stacks = [buffer.div_(math.sqrt(r)).to(dtype) for buffer in buffers]
    left = stacks.pop(0) if side in ("left", "both") else None
    right = stacks.pop(0) if side in ("right", "both") else None
    if shard is not None and left is not None:
        left = left[:, shard.row_offset:shard.row_offset + shard.rows]
    return left, right
