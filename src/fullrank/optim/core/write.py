"""The step's one writer: what a bucket's result (``compute.py``) and a refresh (``refresh.py``) change
in the weights and the optimizer state.

* **weights** by the group's weight writer (``units/weights.py``), inside the compiled bucket step;
* **moments** handed back to their store (8-bit: quantized; 32-bit: they were updated in place);
* **unit state**: every stepped unit's new state (the rule's, the limiter's, a transform's), and the
  trigger's energy, for the whole group at once;
* **P**: a new subspace installed, the moments carried over (``on_switch``) and each unit's state
  told of the switch (``Unit.at_switch``).

Where ``keep`` (a 0-d bool) is false nothing changes: every write is masked on the device.
"""
from __future__ import annotations

import torch

from ..base import shards
from ..base.units import policies
from ..units.adam import as_mask
from ..units.moments import EXP_AVG
from ..units.projection import low_rank_shape, projection_side
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT, PROJ_SEED
from ..units.schedule import CAPTURED_ENERGY, record_energy_, stacked_energy
from ..units.switch import MomentCarry, switch_moments_
from ..units.weights import FactoredUpdate


def write_weights(inp, result) -> None:
    """W ← W·decay − η·update by the bucket's weight writer (``inp``: its ``compute.BucketInput``)."""
    if isinstance(result.update, FactoredUpdate):
        inp.writer.write_matrix(inp.params[0], result.update)
    else:
        inp.writer.write_stack(inp.params, result.update, result.step_sizes, result.decay, inp.keep, inp.generators)


def write_state(plan, states: list[dict], inp, result, stats) -> None:
    """The moments back to their store, and every unit's new state (unchanged where ``keep`` is
    false); the residual's statistics to ``stats`` (a ``stats.ResidualStats`` or None)."""
    plan.store.save(states, inp.exp_avgs, inp.exp_avg_sqs, inp.keep)
    for key, value in result.unit_state.items():
        old = [s[key] for s in states]
        if inp.keep is not None:
            value = torch.where(inp.keep, value, inp.unit_state[key] if key in inp.unit_state else torch.stack(old))
        torch._foreach_copy_(old, list(value.unbind(0)))
    if result.residual_sq is not None and stats is not None:
        stats.add(result.residual_sq, result.factors)


def write_energy(plan, captured: list, grad_norms: dict, states, keep: torch.Tensor | None) -> None:
    """The captured energy's moving average per matrix (``units/schedule.py``) from ``captured``
    (bucket members, ‖R‖ per matrix), for the whole group at once; a matrix without an average (new,
    or at a new subspace) starts it at this step's value."""
    members = [item for bucket_members, _ in captured for item in bucket_members]
    member_states = [states[item.param] for item in members]
    low_norms = captured[0][1] if len(captured) == 1 else torch.cat([norms for _, norms in captured])
    norms = [grad_norms.get(id(item.param)) for item in members]
    if None in norms or norms[0].dtype != low_norms.dtype:
        norms = [torch.linalg.vector_norm(item.grad, dtype=low_norms.dtype) for item in members]
    energy = stacked_energy(low_norms, torch.stack(norms))
    beta = plan.values.refresh_beta
    if all(CAPTURED_ENERGY in s for s in member_states):
        averages = [s[CAPTURED_ENERGY] for s in member_states]
        weight = 1.0 - beta if keep is None else as_mask(keep, energy) * (1.0 - beta)
        stacked = torch.stack(averages).lerp_(energy, weight)
        torch._foreach_copy_(averages, list(stacked.unbind(0)))
        return
    for k, state in enumerate(member_states):
        record_energy_(state, energy[k].clone(), beta)


def install_subspaces(plan, changes: list) -> set[int]:
    """Install every new subspace of ``changes`` (``refresh.NewSubspace``); returns the ids of the
    parameters that got one."""
    for change in changes:
        _install(plan, change)
    return {id(change.item.param) for change in changes}


def _install(plan, new) -> None:
    """Write the new projection (whole ``left``/``right``, or a seed) into the state, carry the moments
    over (``on_switch``) and tell the units; a sharded rank keeps its rows of P and its share of the
    moments."""
    values, item, state = plan.values, new.item, new.state
    shape = item.full_shape
    side = projection_side(values.proj_type, shape)
    left, right, seed = new.left, new.right, new.seed
    if seed is not None:
        m, n = shape
        r = values.rank
        low_shape = torch.Size((r if side in ("left", "both") else m, r if side in ("right", "both") else n))
    else:
        low_shape = low_rank_shape(shape, left, right)
    rotations = None
    shard = item.shard
    if shard is not None:
        if side == "left":
            low_shape = torch.Size((low_shape[0], shards.chunk_span(shape[1], shard.world, shard.rank)[1]))
            if left is not None:
                left = shards.local_rows(left, shard)
                old = state.get(PROJ_LEFT)
                if values.on_switch in ("reproject", "ldadam") and old is not None:  # P_newᵀ·P_old = Σ_k over rows
                    rotations = (shards.all_reduce_(left.T @ old, shard.group), None)
        else:
            low_shape = torch.Size((shard.rows, low_shape[1]))
    split = shards.state_split(shard, side)
    if EXP_AVG not in state:
        plan.store.zeros(state, low_shape, item.grad, split)
    else:
        switch_moments_(state, values.on_switch, left, right, low_shape,
                        MomentCarry(plan.store, item.grad, values.betas, rotations, split))
    for key, value in ((PROJ_LEFT, left), (PROJ_RIGHT, right), (PROJ_SEED, seed)):
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    for unit in (*plan.units.all(), *policies()):
        unit.at_switch(state, values)
