"""The one step path, after the gradients were gathered and checked (``finiteness.py``):

    refresh (counters on the host only) → per bucket: BucketInput → compute → BucketResult → writer

The modes differ only in where the finiteness flag and the counters live (``finiteness.Guard``):

==================  ===================  ====================  =========================================
mode                flag                 counters, η           what it means here
==================  ===================  ====================  =========================================
default             read on the host     ints, float on host   unmasked; refreshes run
capturable=True     device (masks all)   0-d device tensors    steady: no refresh; G zeroed where masked
layer-wise          device (one param.)  ints, float on host   one bucket of one parameter; refreshes run
==================  ===================  ====================  =========================================

A layer-wise step is this path for one parameter: ``SubspaceAdamW.step_parameter`` gathers it,
checks it (``finiteness.one_parameter``) and calls :func:`run` with its one item.
"""
from __future__ import annotations

import torch

from ..base import shards
from ..base.counters import ADAM_STEP, COUNTER_KEYS, STEP, advance
from ..units import adam as inner_adam
from ..units.projection import projection_side
from .buckets import GroupWork, Item, buckets, refuse_on_shards
from .compute import BucketInput
from .finiteness import Guard
from .plain import fused_masked_step, plain_step
from .plan import GroupPlan, learning_rate
from .refresh import due_subspaces
from .write import install_subspaces, write_energy, write_state


def run(work: list[GroupWork], states, guard: Guard, stats) -> set[int]:
    """Step every group of ``work``; returns the ids of the parameters whose subspace was refreshed.
    ``stats``: a ``stats.ResidualStats`` the residual's statistics are added to, or None."""
    refreshed: set[int] = set()
    for part in work:
        if not part.items:
            continue
        if part.plan.units is not None:
            refreshed |= step_projected(part, states, guard, stats)
        elif not guard.on_host:  # capturable=True: torch's fused kernel masked by the flag
            fused_masked_step(part.plan, part.items, states, part.group["lr"], guard.keep)
        else:
            refuse_on_shards(part.plan.values, part.items, projected=False)
            plain_step(part.plan, part.items, states, learning_rate(part.group), guard.keep)
    return refreshed


def step_projected(part: GroupWork, states, guard: Guard, stats) -> set[int]:
    """Refresh what is due (counters on the host), then step every bucket of a projected group."""
    plan, items = part.plan, part.items
    refuse_on_shards(plan.values, items, projected=True)
    if not plan.units.rule.shard_aware and any(item.shard is not None for item in items):
        raise ValueError(f"residual={plan.values.residual!r} is not shard_aware: it cannot step FSDP2-sharded "
                         "parameters (see units/rules.py: take norms through the Bucket and set shard_aware)")
    for item in items:
        state = states[item.param]
        if not state:
            state[STEP] = 0
            state[ADAM_STEP] = 0
    if plan.units.transform.active:  # G̃ from G before the refresh and the projection (units/transforms.py)
        for item in items:
            item.grad = plan.units.transform.before(item.grad.unsqueeze(0), [states[item.param]], plan.values)[0]
            guard.grad_norms.pop(id(item.param), None)  # the rules see G̃: its norm is taken anew
    refreshed = set()
    if guard.on_host:
        refreshed = install_subspaces(plan, due_subspaces(plan, items, states, guard.flagged,
                                                          len(part.group["params"])))
    captured = [] if plan.trigger else None
    lr = learning_rate(part.group) if guard.on_host else part.group["lr"]  # (a capturable step never reads η)
    for members in buckets(items, states, plan.values.bucket_cap_mb):
        step_bucket(plan, members, states, guard, lr, captured, stats)
    if captured:
        write_energy(plan, captured, guard.grad_norms, states, guard.keep)
    return refreshed


def step_bucket(plan: GroupPlan, members: list[Item], states, guard: Guard, lr, captured: list | None,
                stats) -> None:
    """Count the step, then one bucket's compute and write at η ``lr``; ``captured`` collects
    (members, ‖R‖ per matrix) for the convergence trigger."""
    member_states = [states[i.param] for i in members]
    advance(member_states, COUNTER_KEYS, guard.keep)
    side = projection_side(plan.values.proj_type, members[0].full_shape)
    inp = bucket_input(plan, members, member_states, guard, side, lr)
    compiled = (plan.values.compile and inp.shard is None and not plan.units.transform.active and not plan.trigger
                and inp.generators is None and (guard.keep is None or guard.zero_grads))
    if compiled:  # what changes from step to step enters as tensors: no recompilation
        inp.adam_steps, inp.lr = _as_device_scalars(inp.adam_steps, lr, inp.grads.device)
    result = plan.bucket_step(side, compiled)(inp)
    write_state(plan, member_states, inp, result, stats)
    if captured is not None:
        captured.append((members, result.low_norms))


def bucket_input(plan: GroupPlan, members: list[Item], member_states: list[dict], guard: Guard, side: str,
                 lr) -> BucketInput:
    """One bucket's input at η ``lr``: its gradients stacked (for one matrix: a view; where the flag
    masks the step on the device, zeroed), P stacked on its ``side``, the moments the store lends, and
    the stepped units' state."""
    keep, single = guard.keep, len(members) == 1
    weight = members[0].weight
    writer = plan.writer(weight.dtype)
    grads = members[0].grad.unsqueeze(0) if single else torch.stack([i.grad for i in members])
    if guard.zero_grads:  # (the view of one matrix is the caller's gradient: copied, never written)
        grads = torch.where(keep, grads, 0) if single else grads.masked_fill_(keep.logical_not(), 0)
    elif single and keep is None and not writer.in_place:  # the update is assembled in the stack: not in param.grad
        grads = grads.clone()
    shard = None if members[0].shard is None else shards.BucketShard(members[0].shard, side)
    projection = plan.units.projector.stacked(plan.values, members, member_states, side)
    exp_avgs, exp_avg_sqs = plan.store.load(member_states)
    unit_state = _stacked_unit_state(plan.units.stepped(), members, member_states)
    generators = writer.generators(plan.values.seed, [i.ordinal for i in members], [s[STEP] for s in member_states],
                                   weight.device, [0 if i.shard is None else i.shard.row_offset for i in members])
    return BucketInput(params=[i.weight for i in members], grads=grads, projection=projection, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs, adam_steps=[s[ADAM_STEP] for s in member_states],
                       grad_norms=[guard.grad_norms.get(id(i.param)) for i in members], unit_state=unit_state,
                       lr=lr, writer=writer, keep=keep, shard=shard, generators=generators)


def _stacked_unit_state(units: tuple, members: list[Item], member_states: list[dict]) -> dict[str, torch.Tensor]:
    """The units' declared state, made for matrices that do not have it yet, stacked over the bucket."""
    stacked = {}
    for unit in units:
        for key, make in unit.state.items():
            for item, state in zip(members, member_states):
                if key not in state:
                    state[key] = make(item.weight)
            stacked[key] = torch.stack([s[key] for s in member_states])
    return stacked


def _as_device_scalars(steps: list, lr, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step counts and η as 0-d fp32 tensors on ``device`` (a compiled step sees them as inputs, not
    constants: it is not recompiled when they change)."""
    if not inner_adam.on_device(steps):
        steps = list(inner_adam.host_values(steps, device).unbind(0))
    if not isinstance(lr, torch.Tensor):
        lr = inner_adam.host_values([lr], device)[0]
    return steps, lr
