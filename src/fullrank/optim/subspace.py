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

It also gives the bucket step its stacked projections (``stacked_projection``), regenerating
APOLLO's seed-only Gaussian P in place.
"""
from __future__ import annotations

import math

import torch

from . import random_proj
from . import state as S
from .projector import low_rank_shape, projection_side, truncated_projection
from .random_proj import gaussian_projection, orthonormal_random_projection
from .rank import energy_rank, is_adaptive, rank_bounds
from .refresh import refresh_due, stagger_offset, uses_trigger
from .svd import draw_sketch, exact_svd, randomized_svd, warm_subspace
from .switch import switch_moments_


def _generator(group: dict, item, state: dict, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(random_proj.projection_seed(group["seed"], item.ordinal, state[S.STEP]))
    return generator


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _svd_factors(group: dict, members, states, grads: torch.Tensor, rank: int):
    """(U, S, Vh) of a stack of gradients at ``rank`` by the group's backend."""
    if group["svd"] == "randomized":
        shape = tuple(grads.shape[-2:])
        sketch = _stack([draw_sketch(shape, rank, group["oversample"], grads.dtype,
                                     _generator(group, item, state, grads.device), grads.device)
                         for item, state in zip(members, states)])
        return randomized_svd(grads, rank, oversample=group["oversample"], power_iters=group["power_iters"],
                              sketch=sketch)
    return exact_svd(grads, rank)


def _warm(group: dict, states, grads: torch.Tensor, side: str):
    """New (left, right) stacks by subspace iteration from the stored bases."""
    left = right = None
    iters = group["warm_iters"]
    if side in ("left", "both"):
        left = warm_subspace(grads, _stack([s[S.PROJ_LEFT] for s in states]), "left", iters)
    if side in ("right", "both"):
        right = warm_subspace(grads, _stack([s[S.PROJ_RIGHT] for s in states]), "right", iters)
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
        warm = group["svd"] == "warm" and S.EXP_AVG in state
        key = (item.grad.device, item.grad.dtype, tuple(item.grad.shape), warm, tuple(state.get(S.EXP_AVG, ()).shape)
               if warm else None)
        by_shape.setdefault(key, []).append((item, state))
    installs, pending_ranks = [], []
    for (_, _, shape, warm, _), pairs in by_shape.items():
        members, states = [p[0] for p in pairs], [p[1] for p in pairs]
        side = projection_side(group["proj_type"], shape)
        if group["projector"] == "random":
            installs.extend(_random_projections(group, members, states, shape, side))
            continue
        grads = _stack([item.grad for item in members])
        if warm:
            left, right = _warm(group, states, grads, side)
            installs.extend((item, state, (None if left is None else left[b], None if right is None else right[b]), None)
                            for b, (item, state) in enumerate(pairs))
            continue
        low, high = rank_bounds(group, shape)
        U, singular, Vh = _svd_factors(group, members, states, grads, high)
        U = U if side != "right" else None
        Vh = Vh if side != "left" else None
        if is_adaptive(group):
            total = torch.linalg.vector_norm(grads, dim=(-2, -1), dtype=singular.dtype).square()
            ranks = energy_rank(singular, total, group["rank_energy"], low, high)
            pending_ranks.append(ranks)
            rank_of = ("pending", len(pending_ranks) - 1)
        else:
            rank_of = high
        for b, (item, state) in enumerate(pairs):
            factors = (None if U is None else U[b], None if Vh is None else Vh[b])
            installs.append((item, state, factors, (rank_of, b)))
    read = _read_ranks(pending_ranks)
    for item, state, projection, rank in installs:
        if isinstance(projection, dict):  # a seed
            _install(group, state, item.grad, None, None, projection["seed"])
            continue
        if rank is not None:
            rank_of, b = rank
            r = read[rank_of[1]][b] if isinstance(rank_of, tuple) else rank_of
            left, right = truncated_projection(*projection, r, projection_side(group["proj_type"], tuple(item.grad.shape)),
                                               item.grad.dtype)
        else:
            left, right = (None if t is None else t.to(item.grad.dtype, copy=True).contiguous() for t in projection)
        _install(group, state, item.grad, left, right, None)
    return {id(item.param) for item, _ in due}


def _read_ranks(pending: list[torch.Tensor]) -> list[list[int]]:
    """All adaptive ranks of the step, read in one transfer per device."""
    if not pending:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for k, ranks in enumerate(pending):
        by_device.setdefault(ranks.device, []).append(k)
    read: list[list[int] | None] = [None] * len(pending)
    for device, indices in by_device.items():
        values = torch.cat([pending[k] for k in indices]).tolist()
        for k in indices:
            n = pending[k].numel()
            read[k], values = values[:n], values[n:]
    return read


def _random_projections(group: dict, members, states, shape, side):
    """APOLLO's seeds (seed-only groups) or GoLore's stored orthonormal bases, one per matrix."""
    out = []
    for item, state in zip(members, states):
        seed = random_proj.projection_seed(group["seed"], item.ordinal, state[S.STEP])
        if random_proj.stores_seed_only(group):
            out.append((item, state, {"seed": seed}, None))
        else:
            projection = orthonormal_random_projection(shape, side, group["rank"], seed, item.grad.device, item.grad.dtype)
            out.append((item, state, projection, None))
    return out


def _install(group: dict, state: dict, grad: torch.Tensor, left, right, seed) -> None:
    """Write the new projection into the state and carry the moments over (``on_switch``)."""
    side = projection_side(group["proj_type"], tuple(grad.shape))
    if seed is not None:
        m, n = grad.shape
        r = group["rank"]
        low_shape = torch.Size((r if side in ("left", "both") else m, r if side in ("right", "both") else n))
    else:
        low_shape = low_rank_shape(tuple(grad.shape), left, right)
    if S.EXP_AVG not in state:
        S.new_moments(state, low_shape, grad)
    else:
        switch_moments_(state, group["on_switch"], left, right, low_shape)
        if group["reset_limiter_on_switch"]:
            state[S.RESIDUAL_NORM] = torch.zeros_like(state[S.RESIDUAL_NORM])
    for key, value in ((S.PROJ_LEFT, left), (S.PROJ_RIGHT, right), (S.PROJ_SEED, seed)):
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    if uses_trigger(group):
        state[S.LAST_REFRESH] = state[S.STEP]


def stacked_projection(optimizer, group: dict, plan, members, states, side: str):
    """(left, right) stacks of the bucket's projections (None for an unused side); APOLLO's Gaussian P
    regenerated from each matrix's seed into one buffer."""
    if not plan.seed_only:
        left = _stack([s[S.PROJ_LEFT] for s in states]) if side in ("left", "both") else None
        right = _stack([s[S.PROJ_RIGHT] for s in states]) if side in ("right", "both") else None
        return left, right
    shape = tuple(members[0].grad.shape)
    if len(members) == 1:
        left, right = gaussian_projection(shape, side, group["rank"], states[0][S.PROJ_SEED],
                                          members[0].grad.device, members[0].grad.dtype)
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
    return left, right
