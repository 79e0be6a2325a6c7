"""The step's items (one parameter with a gradient) and their buckets: the projected matrices of a
group that share device, dtype, shape, projection side and rank, stacked and stepped together.

LLaMA has three weight shapes: ~3 buckets per group, so the number of operations per step is set by
the number of buckets, not by depth. Buckets are capped at ``bucket_cap_mb`` of stacked gradient: the
transient memory of a step is at most that cap (or one matrix, if larger) for the gradient stack plus
the bucket's low-rank temporaries (R, ψ, moments: ≈ 3·r/min(m, n) of it), e.g. 256 MiB against the
13 GiB of bf16 gradients of LLaMA-7B (2%). On the CPU the default bucket is one matrix: there the
step is bound by memory traffic, not launches, and a one-matrix bucket is a view of its gradient
whose update goes straight into the weight (one ``addmm_`` and one ``addcmul_``, two passes over W).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import shards
from ..units.moments import low_shape
from .plan import GroupPlan

MIB = 2**20
# bucket_cap_mb=None: one matrix per bucket on the CPU (launches are cheap there and memory traffic is
# what costs: a one-matrix bucket is a view of its gradient, written straight into the weight), this
# many MiB of stacked gradient elsewhere (a GPU's step is bound by launches).
DEFAULT_BUCKET_CAP_MB = 256.0


@dataclass
class Item:
    """One parameter with a gradient this step."""

    ordinal: int  # position over all groups (seeds random draws)
    index: int  # position in its group (refresh staggering)
    param: torch.Tensor  # the state's key (an FSDP2 DTensor, or the tensor itself)
    grad: torch.Tensor  # this rank's part of the gradient
    name: str
    weight: torch.Tensor | None = None  # this rank's part of the parameter, written in place
    shard: shards.RowShard | None = None  # where that part lies (FSDP2), None: the whole tensor

    def __post_init__(self):
        if self.weight is None:
            self.weight = self.param

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass
class GroupWork:
    """A group's items of this step, with its plan."""

    group: dict
    plan: GroupPlan
    items: list[Item]


def check_dense(grad: torch.Tensor, name: str) -> None:
    if grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient; SubspaceAdamW needs dense gradients")


def by_device_and_dtype(items: list[Item]) -> list[tuple[torch.device, list[Item]]]:
    """(device, items) per device and dtype of the weights: the plain groups' kernel buckets."""
    kinds: dict[tuple, list[Item]] = {}
    for item in items:
        kinds.setdefault((item.weight.device, item.weight.dtype), []).append(item)
    return [(device, members) for (device, _), members in kinds.items()]


def buckets(items: list[Item], states, cap_mb: float | None) -> list[list[Item]]:
    """Items of equal device, dtype, shape, side and low-rank shape, in chunks of at most ``cap_mb``
    MiB of gradient (at least one matrix each; None: the device's default)."""
    by_key: dict[tuple, list[Item]] = {}
    for item in items:
        key = (item.weight.device, item.weight.dtype, item.full_shape, tuple(low_shape(states[item.param])),
               None if item.shard is None else id(item.shard.group))
        by_key.setdefault(key, []).append(item)
    out = []
    for (device, *_), members in by_key.items():
        cap = cap_mb
        if cap is None:  # FSDP2 shards stack on the CPU too: there a bucket's collectives cost latency
            cap = 0.0 if device.type == "cpu" and members[0].shard is None else DEFAULT_BUCKET_CAP_MB
        cap *= MIB
        size = members[0].grad.numel() * members[0].grad.element_size()
        per_bucket = max(1, int(cap // size)) if size else len(members)
        out.extend(members[k:k + per_bucket] for k in range(0, len(members), per_bucket))
    return out


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """B×… from B tensors (one: a view, no copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def refuse_on_shards(values, items: list[Item], projected: bool) -> None:
    """capturable=True and pre-projection transforms are refused on FSDP2 shards (with the option named)."""
    if not any(item.shard is not None for item in items):
        return
    name = items[0].name
    if values.capturable:
        raise ValueError(f"capturable=True is not supported on FSDP2-sharded parameters ({name!r}); "
                         "train with capturable=False under --fsdp")
    if projected and values.pre_projection != "none":
        raise ValueError(f"pre_projection={values.pre_projection!r} is not supported on FSDP2-sharded "
                         f"parameters ({name!r}); train without --fsdp")
