"""The plain groups (no ``rank``): torch.optim.AdamW's update per device and dtype.

torch's own fused kernel (``torch.optim.adamw.adamw(fused=True)``) where its convention applies, else
``torch._foreach_*`` kernels or a loop, like ``torch/optim/adamw.py``; 8-bit moments and weights
written by a writer with a working copy (stochastic rounding) chunk by chunk. ``keep`` (a 0-d bool)
masks the step on the device: the fused kernel's ``found_inf``, or the masked update.
"""
from __future__ import annotations

import torch

from ..base import shards
from ..base.counters import STEP, advance
from ..units import adam as inner_adam
from ..units.adam import AdamTensors
from ..units.moments import EXP_AVG, EXP_AVG_SQ, chunk_spans
from .buckets import Item, by_device_and_dtype
from .plan import GroupPlan


def _batch(members: list[Item], states, steps: list | None = None) -> AdamTensors:
    member_states = [states[i.param] for i in members]
    return AdamTensors([i.weight for i in members], [i.grad for i in members],
                       [s[EXP_AVG] for s in member_states], [s[EXP_AVG_SQ] for s in member_states],
                       [s[STEP] for s in member_states] if steps is None else steps)


def plain_step(plan: GroupPlan, items: list[Item], states, lr: float, keep: torch.Tensor | None = None) -> None:
    """One AdamW step of a plain group's ``items`` at η ``lr`` (``keep``: the layer-wise mode's mask)."""
    for item in items:
        state = states[item.param]
        if not state:
            state[STEP] = 0
            plan.store.zeros(state, item.weight.shape, item.weight, shards.state_split(item.shard, None))
        state[STEP] += 1
    chunked = [states[item.param][EXP_AVG].dtype == torch.uint8 or not plan.writer(item.weight.dtype).in_place
               for item in items]
    if any(chunked):  # 8-bit moments or stochastic rounding: chunk by chunk
        for item, by_chunks in zip(items, chunked):
            if by_chunks:
                _chunked_step(plan, item, states[item.param], lr, keep)
        items = [item for item, by_chunks in zip(items, chunked) if not by_chunks]
        if not items:
            return
    values = plan.values
    fused = values.fused or (values.fused is None and values.foreach is None)
    for device, members in by_device_and_dtype(items):
        batch = _batch(members, states)
        if fused and inner_adam.fused_applies(batch.params[0], values.adam_convention):  # keep: its found_inf
            batch.steps = _fused_step_counts(batch.steps, device)
            inner_adam.fused_adamw_(batch, plan.adam, lr, None if keep is None else keep.logical_not().float())
        elif keep is not None:  # (layer-wise: one parameter)
            inner_adam.masked_adamw_(batch, plan.adam, lr, keep)
        else:
            inner_adam.adamw_(batch, plan.adam, lr, foreach=values.foreach is not False)


def _fused_step_counts(steps: list[int], device: torch.device) -> list[torch.Tensor]:
    """The int step counts (already advanced) as the 0-d fp32 tensors torch's fused AdamW advances
    itself, so one less (``inner_adam.host_values``: no host synchronisation)."""
    return list(inner_adam.host_values([step - 1 for step in steps], device).unbind(0))


def _chunked_step(plan: GroupPlan, item: Item, state: dict, lr: float, keep: torch.Tensor | None) -> None:
    """AdamW on one plain parameter, in chunks of whole 8-bit blocks: dequantize a chunk's moments,
    step it in fp32 (the weight too, when its writer works on a copy), store it back. The fp32
    working set is one chunk, whatever the parameter's size (an embedding of LLaMA-7B: 131M values)."""
    quantized = state[EXP_AVG].dtype == torch.uint8
    writer = plan.writer(item.weight.dtype)
    generators = writer.generators(plan.values.seed, [item.ordinal], [state[STEP]], item.weight.device,
                                   [0 if item.shard is None else item.shard.row_offset])
    work = item.weight if item.weight.is_contiguous() else item.weight.contiguous()
    flat_weight, flat_grad = work.view(-1), item.grad.reshape(-1)
    for span in chunk_spans(flat_weight.numel()):
        if quantized:
            exp_avg, exp_avg_sq = plan.store.load_span(state, span)
        else:
            exp_avg, exp_avg_sq = state[EXP_AVG].view(-1)[span], state[EXP_AVG_SQ].view(-1)[span]
        weight = writer.working_copy(flat_weight[span])
        batch = AdamTensors([weight], [flat_grad[span].to(exp_avg.dtype)], [exp_avg], [exp_avg_sq], [state[STEP]])
        if keep is None:
            inner_adam.adamw_(batch, plan.adam, lr, foreach=False)
        else:
            inner_adam.masked_adamw_(batch, plan.adam, lr, keep)
        if quantized:
            plan.store.save_span(state, span, exp_avg, exp_avg_sq, keep)
        if not writer.in_place:
            writer.write_back(flat_weight[span], weight, generators[0])
    if work is not item.weight:
        item.weight.copy_(work)


def fused_masked_step(plan: GroupPlan, items: list[Item], states, lr, keep: torch.Tensor) -> None:
    """A plain group under ``capturable=True``, masked by ``keep``: torch's functional AdamW, fused,
    with ``found_inf`` (eager); under ``torch.compile`` (which does not trace the fused kernel)
    :func:`inner_adam.adamw_` masked, the gradients zeroed in the graph."""
    for device, members in by_device_and_dtype(items):
        batch = _batch(members, states)
        here = keep if keep.device == device else keep.to(device, non_blocking=True)
        if torch.compiler.is_compiling():
            advance([states[i.param] for i in members], (STEP,), here)  # (in place: ``batch.steps`` holds them)
            batch.grads = [torch.where(here, g, 0) for g in batch.grads]
            inner_adam.adamw_(batch, plan.adam, lr, foreach=True, keep=here)
            continue
        inner_adam.fused_adamw_(batch, plan.adam, lr, here.logical_not().to(torch.float32))
