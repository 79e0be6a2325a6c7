"""The optimizer state of FSDP2-sharded parameters as ``torch.distributed.checkpoint`` (DCP) saves it.

Every rank holds its share of each matrix's state (``shards.py``). For DCP each share becomes a
DTensor of the *whole* state tensor with the placement that says where the share lies, so a
checkpoint written by w ranks loads on any number of ranks (DCP reshards)::

    plain parameter   exp_avg, exp_avg_sq            Shard(0), the parameter's shape
    right projection  exp_avg, exp_avg_sq  (m×r)     Shard(0)    proj_right (r×n)  Replicate
    left projection   exp_avg, exp_avg_sq  (r×n)     Shard(1)    proj_left  (m×r)  Shard(0)
    every matrix      the units' scalars (0-d)       Replicate   counters, proj_seed: plain ints

Keys are flat, ``<prefix>/state/<parameter FQN>/<key>``; the groups' options are
``<prefix>/param_groups`` (parameters by FQN). Loading reads each tensor's whole shape from the
checkpoint's metadata (adaptive ranks differ per matrix), builds an empty DTensor of that shape laid
out for this mesh, lets DCP fill it and keeps the local part.
"""
from __future__ import annotations

import json

import torch

from ..base import shards
from ..core import loaded_state
from ..core.optimizer import SubspaceAdamW
from ..core.plan import is_projected
from ..units.projection import projection_side
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT

STATE_SEP = "/"


def _fqns(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _placement(key: str, group: dict, param: torch.Tensor, ndim: int):
    """The placements of state ``key`` (a tensor of ``ndim`` dimensions) of ``param``."""
    if ndim == 0 or key == PROJ_RIGHT:
        return (shards.Replicate(),)
    if not is_projected(group) or key == PROJ_LEFT:
        return (shards.Shard(0),)
    side = projection_side(group["proj_type"], tuple(param.shape))
    return (shards.Shard(1),) if side == "left" else (shards.Shard(0),)


def _global_shape(local: torch.Tensor, placements, param: torch.Tensor) -> torch.Size:
    """The whole shape of a state tensor of which this process holds ``local``."""
    if placements == (shards.Replicate(),):
        return local.shape
    shape = list(local.shape)
    if placements == (shards.Shard(0),):
        shape[0] = param.shape[0]
    else:
        shape[1] = param.shape[1]
    return torch.Size(shape)


def distributed_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module, prefix: str = "optimizer") -> dict:
    """The optimizer's state as a flat dict for ``dcp.save``: sharded parts as DTensors of the whole tensors."""
    _check(optimizer)
    names = _fqns(model)
    out: dict = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in group["params"]]})
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            shard = shards.row_shard(param, names[id(param)])
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and shard is not None:
                    placements = _placement(key, group, param, value.dim())
                    shape = _global_shape(value, placements, param)
                    value = shards.DTensor.from_local(value, shard.mesh, placements, run_check=False, shape=shape,
                                                        stride=torch.empty(shape, device="meta").stride())
                out[f"{prefix}{STATE_SEP}state{STATE_SEP}{names[id(param)]}{STATE_SEP}{key}"] = value
    out[f"{prefix}{STATE_SEP}param_groups"] = json.dumps(groups)  # one leaf (DCP would flatten a list)
    out[f"{prefix}{STATE_SEP}skipped_steps"] = getattr(optimizer, "skipped_steps", 0)
    return out


def load_distributed_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module, checkpoint_dir,
                                prefix: str = "optimizer") -> None:
    """Load what :func:`distributed_state_dict` saved into ``checkpoint_dir`` (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check(optimizer)
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    by_name = {name: p for name, p in model.named_parameters()}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    head = f"{prefix}{STATE_SEP}state{STATE_SEP}"
    template: dict = {f"{prefix}{STATE_SEP}param_groups": None, f"{prefix}{STATE_SEP}skipped_steps": 0}
    entries = []
    for key, meta in metadata.items():
        if not key.startswith(head):
            continue
        fqn, _, state_key = key[len(head):].rpartition(STATE_SEP)
        if fqn not in by_name:
            raise ValueError(f"the checkpoint holds optimizer state for {fqn!r}, which this model does not have")
        param = by_name[fqn]
        entries.append((key, param, state_key))
        if not isinstance(meta, TensorStorageMetadata):
            template[key] = None
            continue
        shard = shards.row_shard(param, fqn)
        dtype = meta.properties.dtype
        if shard is None:
            template[key] = torch.empty(meta.size, dtype=dtype, device=_device(param))
            continue
        placements = _placement(state_key, group_of[id(param)], param, len(meta.size))
        local_shape = list(meta.size)
        if placements != (shards.Replicate(),):
            dim = placements[0].dim
            local_shape[dim] = shards.chunk_span(meta.size[dim], shard.world, shard.rank)[1]
        local = torch.empty(local_shape, dtype=dtype, device=_device(param))
        template[key] = shards.DTensor.from_local(local, shard.mesh, placements, run_check=False, shape=meta.size,
                                                    stride=torch.empty(meta.size, device="meta").stride())
    dcp.load(template, checkpoint_id=str(checkpoint_dir))
    saved_groups = template[f"{prefix}{STATE_SEP}param_groups"]
    saved_groups = None if saved_groups is None else json.loads(saved_groups)
    if saved_groups is None or len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {0 if saved_groups is None else len(saved_groups)} param "
                         f"groups, this one {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        names = [n for n, p in by_name.items() if id(p) in {id(q) for q in group["params"]}]
        if sorted(saved["params"]) != sorted(names):
            raise ValueError("the checkpoint's param groups hold other parameters than this optimizer's")
        group.update({k: tuple(v) if isinstance(v, list) and k == "betas" else v
                      for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for key, param, state_key in entries:
        value = template[key]
        if isinstance(value, torch.Tensor):
            value = shards.local(value)
        optimizer.state[param][state_key] = value
    optimizer.skipped_steps = int(template[f"{prefix}{STATE_SEP}skipped_steps"])
    optimizer.forget_caches()
    _validate(optimizer, model)


def _check(optimizer) -> None:
    if not isinstance(optimizer, SubspaceAdamW):
        raise TypeError(f"expected a fullrank SubspaceAdamW (or preset), got {type(optimizer).__name__}; torch "
                        "optimizers keep DTensor state: use torch.distributed.checkpoint.state_dict for them")


def _device(param: torch.Tensor) -> torch.device:
    return shards.local(param).device


def _validate(optimizer, model) -> None:
    names = _fqns(model)
    for group in optimizer.param_groups:
        if not is_projected(group):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                loaded_state.validate_projected_state(state, param, names[id(param)], optimizer.plan(group),
                                                      shards.row_shard(param, names[id(param)]))
