"""The step's check of its gradients, and where its flag lives.

Every gradient's norm is taken first (one ``_foreach_norm`` per device); a finite 2-norm proves every
entry finite (NaN and ±inf propagate through the sum of squares). The flag ``keep`` (0-d bool: every
gradient finite) is a device value in every mode; what differs is whether the host reads it:

* :func:`read_on_host` (the default step): read in the step's one host synchronisation, together
  with the convergence flags of ``units/schedule.py``, before anything is written; the step raises
  (:class:`NonFiniteGradientError`) or is skipped, and otherwise runs unmasked.
* :func:`keep_on_device` (``capturable=True``): never read; it masks the whole step.
* :func:`one_parameter` (the layer-wise mode): one parameter's flag, which masks its step and which
  ``LayerwiseOptimizer.step`` reads for every parameter at once.

The step reuses the norms (``Guard.grad_norms``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import host, shards
from ..base.norms import norm_dtype
from ..units.schedule import CAPTURED_ENERGY
from .buckets import GroupWork


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or ±inf; nothing was updated."""


@dataclass
class Guard:
    """Where the step's finiteness flag lives, and what the check found."""

    keep: torch.Tensor | None  # 0-d bool masking every write; None: the host read it true
    grad_norms: dict[int, torch.Tensor]  # ‖G‖ per parameter id, on its device (0 where masked)
    flagged: set[int] = field(default_factory=set)  # parameters whose subspace asked for a refresh
    zero_grads: bool = False  # the buckets zero their gradient stacks where keep is false
    on_host: bool = True  # the counters (and η) are read on the host: refreshes may run


def read_on_host(work: list[GroupWork], states) -> Guard | None:
    """The default step's one host read: None when the step is skipped (``nonfinite="skip"``), else
    the unmasked guard; raises :class:`NonFiniteGradientError` (``nonfinite="raise"``)."""
    finite, flagged, grad_norms = _read_flags(work, states)
    if finite:
        return Guard(None, grad_norms, flagged)
    entries = [(item.grad, item.name, part.plan) for part in work for item in part.items]
    bad = next(((n, plan) for g, n, plan in entries if not bool(torch.isfinite(g).all())), None)
    sharded = [item.shard for part in work for item in part.items if item.shard is not None]
    if sharded:  # every rank must take the same decision: a non-finite entry anywhere counts
        bad = _bad_anywhere(bad, entries, sharded[0].group)
    if bad is None:  # the 2-norm overflowed on finite gradients
        return Guard(None, grad_norms, flagged)
    bad_name, bad_plan = bad
    if bad_plan.values.nonfinite == "skip":
        return None
    raise NonFiniteGradientError(
        f"non-finite gradient (NaN or inf) in parameter {bad_name!r}; no weight or optimizer state "
        "was changed. Use nonfinite='skip' to skip such steps instead."
    )


def _read_flags(work: list[GroupWork], states) -> tuple[bool, set[int], dict[int, torch.Tensor]]:
    """(every gradient finite, the ids of the parameters whose subspace asked for a refresh, each
    gradient's 2-norm by parameter id): one transfer per device."""
    grads: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    energies: dict[torch.device, list[tuple[int, torch.Tensor, float]]] = {}
    for part in work:
        trigger = part.plan.trigger
        for item in part.items:
            grads.setdefault(item.grad.device, []).append((id(item.param), item.grad))
            energy = states.get(item.param, {}).get(CAPTURED_ENERGY) if trigger else None
            if energy is not None:
                energies.setdefault(energy.device, []).append((id(item.param), energy,
                                                               part.plan.values.refresh_threshold))
    finite, flagged, grad_norms = True, set(), {}
    shard_of = {id(item.param): item.shard for part in work for item in part.items if item.shard is not None}
    for device in grads.keys() | energies.keys():
        values = []
        if device in grads:
            norms = torch._foreach_norm([g for _, g in grads[device]], 2)
            if shard_of:
                norms = _whole_norms(grads[device], norms, shard_of)
            grad_norms.update((pid, norm) for (pid, _), norm in zip(grads[device], norms))
            # Only an overflowing sum of huge finite entries tests non-finite here, and the exact
            # check of ``read_on_host`` then clears it.
            values.append(torch.isfinite(torch.stack(norms)).all().reshape(1))
        owners = energies.get(device, [])
        if owners:
            values.append(torch.stack([e for _, e, _ in owners]).lt(_thresholds(owners, device)))
        flags = torch.cat(values)
        read = host.read(flags, [True] * (device in grads) + [False] * (flags.numel() - (device in grads)))
        if device in grads:
            finite = finite and read.pop(0)
        flagged.update(pid for (pid, _, _), hit in zip(owners, read) if hit)
    return finite, flagged, grad_norms


def _thresholds(owners: list, device: torch.device):
    """τ of each trigger (one number when they are all equal)."""
    thresholds = [t for _, _, t in owners]
    if any(t != thresholds[0] for t in thresholds):
        return torch.tensor(thresholds, dtype=owners[0][1].dtype).to(device, non_blocking=True)
    return thresholds[0]


def _whole_norms(pairs, norms, shard_of) -> list[torch.Tensor]:
    """Norms of the whole sharded gradients: one all-reduce of their squared local norms per mesh."""
    norms = list(norms)
    by_group: dict[int, list[int]] = {}
    for k, (pid, _) in enumerate(pairs):
        if pid in shard_of:
            by_group.setdefault(id(shard_of[pid].group), []).append(k)
    for positions in by_group.values():  # (a few ops per mesh, none per matrix)
        group = shard_of[pairs[positions[0]][0]].group
        dtypes = {norms[k].dtype for k in positions}
        sq = torch.stack([norms[k] for k in positions]).to(torch.float64).square_()
        whole = shards.all_reduce_(sq, group).sqrt_()
        if len(dtypes) == 1:
            whole = whole.to(dtypes.pop())
        for k, value in zip(positions, whole.unbind(0)):
            norms[k] = value if value.dtype == norms[k].dtype else value.to(norms[k].dtype)
    return norms


def _bad_anywhere(bad, entries, group):
    """(name, plan) of the first non-finite gradient over all ranks (exchanged only on this rare
    path), so that every rank raises or skips together with the same message."""
    names = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(names, None if bad is None else bad[0], group=group)
    name = next((n for n in names if n is not None), None)
    if name is None:
        return None
    return name, next(plan for _, n, plan in entries if n == name)


def keep_on_device(work: list[GroupWork]) -> Guard:
    """``capturable=True``: every gradient finite, as a 0-d bool on the first gradient's device, and
    ‖G‖ per parameter id (0 where the step is masked): one ``_foreach_norm`` per device, nothing read."""
    by_device: dict[torch.device, list] = {}
    for part in work:
        for item in part.items:
            by_device.setdefault(item.grad.device, []).append(item)
    norms = {device: torch.stack(torch._foreach_norm([i.grad for i in items], 2))
             for device, items in by_device.items()}
    flags = [torch.isfinite(n).all() for n in norms.values()]
    keep = flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()
    grad_norms = {}
    for device, items in by_device.items():
        here = keep if keep.device == device else keep.to(device, non_blocking=True)
        grad_norms.update(zip((id(i.param) for i in items), torch.where(here, norms[device], 0).unbind(0)))
    return Guard(keep, grad_norms, zero_grads=True, on_host=False)


def one_parameter(param: torch.Tensor, grad: torch.Tensor, flagged: bool,
                  shard: shards.RowShard | None = None) -> tuple[torch.Tensor, Guard]:
    """The layer-wise mode's check of one parameter: (its gradient, zero where non-finite, and its
    guard, masked by its own flag; refreshes may run, ``flagged``: its trigger asked for one). On an
    FSDP2 shard (``grad`` this rank's rows) the squared norm is summed over the ranks (one all-reduce
    of one scalar, in fp64 as the ordinary step's): the flag and ‖G‖ are whole, the same on every rank."""
    norm = torch.linalg.vector_norm(grad, dtype=norm_dtype(grad.dtype))
    if shard is not None:
        norm = _whole_norms([(id(param), grad)], [norm], {id(param): shard})[0]
    finite = torch.isfinite(norm)
    zeroed = torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return zeroed, Guard(finite, {id(param): norm.where(finite, 0.0)}, {id(param)} if flagged else set())
