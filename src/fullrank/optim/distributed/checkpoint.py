"""The optimizer state of FSDP2-sharded parameters as ``torch.distributed.checkpoint`` (DCP) saves it.

Every rank holds its share of each matrix's state (``base/shards.py``). For DCP each share becomes a
DTensor of the *whole* state tensor with the placement that says where the share lies, so a
checkpoint written by w ranks loads on any number of ranks (DCP reshards)::

    plain parameter   exp_avg, exp_avg_sq            Shard(0), the parameter's shape
    right projection  exp_avg, exp_avg_sq  (m×r)     Shard(0)    proj_right (r×n)  Replicate
    left projection   exp_avg, exp_avg_sq  (r×n)     Shard(1)    proj_left  (m×r)  Shard(0)
    8-bit moments     exp_avg, exp_avg_sq  (uint8)   as above    exp_avg_absmax, exp_avg_sq_absmax  Shard(0)
                                                                 of w·b₀ block maxima (below)
    every matrix      the units' scalars (0-d)       Replicate   counters, proj_seed: plain ints

Keys are flat, ``<prefix>/state/<parameter FQN>/<key>``; the groups' options are
``<prefix>/param_groups`` (parameters by FQN), and ``<prefix>/world_size`` the number of ranks that
saved it. Loading reads each tensor's whole shape from the checkpoint's metadata (adaptive ranks
differ per matrix), builds an empty DTensor of that shape laid out for this mesh, lets DCP fill it and
keeps the local part.

**8-bit moments** (``units/moments.py``): a rank's block maxima belong to the blocks of its own flat
share, b_k = ⌈share/256⌉ of them. They are saved as rank k's b_k values at offset k·b₀ of a vector of
w·b₀ (b₀ rank 0's count, the largest; zero padding after each rank's), so that every rank's part is
one ``Shard(0)`` chunk: on the same number of ranks the moments load byte for byte. On another
number of ranks the blocks do not line up with the new shares: the loader reads each 8-bit moment
whole, dequantizes every saving rank's share with its maxima and quantizes this rank's share anew
(the moments then differ from the saved ones by one 8-bit rounding; the load holds one moment whole
at a time in fp32, beside the whole 8-bit moments of the checkpoint).
"""
from __future__ import annotations

import json
import math

import torch

from ..base import shards
from ..core import loaded_state
from ..core.optimizer import SubspaceAdamW
from ..core.plan import is_projected
from ..units.moments import ABSMAX_KEYS, BLOCK, EXP_AVG, get_store
from ..units.projection import projection_side
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT
from .layerwise import LayerwiseOptimizer

STATE_SEP = "/"
ABSMAX = frozenset(ABSMAX_KEYS.values())
MOMENT_OF = {absmax: moment for moment, absmax in ABSMAX_KEYS.items()}


def _fqns(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _side(group: dict, param: torch.Tensor) -> str | None:
    """The projection side of a projected parameter, None for a plain one."""
    return projection_side(group["proj_type"], tuple(param.shape)) if is_projected(group) else None


def _placement(key: str, group: dict, param: torch.Tensor, ndim: int):
    """The placements of state ``key`` (a tensor of ``ndim`` dimensions) of ``param``."""
    if ndim == 0 or key == PROJ_RIGHT:
        return (shards.Replicate(),)
    if key in ABSMAX or not is_projected(group) or key == PROJ_LEFT:
        return (shards.Shard(0),)
    return (shards.Shard(1),) if _side(group, param) == "left" else (shards.Shard(0),)


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


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _absmax_width(whole: torch.Size, dim: int, world: int) -> int:
    """b₀: the 8-bit blocks of rank 0's share (the largest) of a whole moment cut along ``dim``."""
    share = list(whole)
    share[dim] = shards.chunk_span(whole[dim], world, 0)[1]
    return _blocks(math.prod(share))


def _as_saved(key: str, value: torch.Tensor, state: dict, group: dict, param: torch.Tensor, shard) -> torch.Tensor:
    """This rank's state tensor as the DTensor of the whole tensor that DCP saves."""
    placements = _placement(key, group, param, value.dim())
    if key in ABSMAX:  # rank k's b_k block maxima at k·b₀ of w·b₀
        moment = state[MOMENT_OF[key]]
        moment_placements = _placement(MOMENT_OF[key], group, param, moment.dim())
        width = _absmax_width(_global_shape(moment, moment_placements, param), moment_placements[0].dim, shard.world)
        value = torch.nn.functional.pad(value, (0, width - value.numel()))
        shape = torch.Size((width * shard.world,))
    else:
        shape = _global_shape(value, placements, param)
    return shards.DTensor.from_local(value, shard.mesh, placements, run_check=False, shape=shape,
                                     stride=torch.empty(shape, device="meta").stride())


def distributed_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module, prefix: str = "optimizer") -> dict:
    """The optimizer's state (a ``SubspaceAdamW``, or a ``LayerwiseOptimizer`` over one) as a flat dict
    for ``dcp.save``: sharded parts as DTensors of the whole tensors."""
    optimizer = _inner(optimizer)
    names = _fqns(model)
    out: dict = {}
    groups = []
    world = 1
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in group["params"]]})
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            shard = shards.row_shard(param, names[id(param)])
            world = world if shard is None else shard.world
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and shard is not None:
                    value = _as_saved(key, value, state, group, param, shard)
                out[f"{prefix}{STATE_SEP}state{STATE_SEP}{names[id(param)]}{STATE_SEP}{key}"] = value
    out[f"{prefix}{STATE_SEP}param_groups"] = json.dumps(groups)  # one leaf (DCP would flatten a list)
    out[f"{prefix}{STATE_SEP}skipped_steps"] = optimizer.skipped_steps
    out[f"{prefix}{STATE_SEP}world_size"] = world
    return out


def load_distributed_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module, checkpoint_dir,
                                prefix: str = "optimizer") -> None:
    """Load what :func:`distributed_state_dict` saved into ``checkpoint_dir`` (any world size) into a
    ``SubspaceAdamW`` or a ``LayerwiseOptimizer`` over one."""
    import torch.distributed.checkpoint as dcp

    wrapper, optimizer = optimizer, _inner(optimizer)
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    by_name = {name: p for name, p in model.named_parameters()}
    head = {f"{prefix}{STATE_SEP}world_size": 0}
    saved_world = None  # (checkpoints of earlier versions do not say; they hold no sharded 8-bit moments)
    if all(key in metadata for key in head):
        dcp.load(head, checkpoint_id=str(checkpoint_dir))
        saved_world = int(head.popitem()[1])
    template: dict = {f"{prefix}{STATE_SEP}param_groups": None, f"{prefix}{STATE_SEP}skipped_steps": 0}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    entries = _template(metadata, by_name, group_of, (prefix, saved_world), template)
    dcp.load(template, checkpoint_id=str(checkpoint_dir))
    _restore_groups(optimizer, by_name, template[f"{prefix}{STATE_SEP}param_groups"])
    optimizer.state.clear()
    for key, param, state_key in entries:
        value = template[key]
        optimizer.state[param][state_key] = shards.local(value) if isinstance(value, torch.Tensor) else value
    names = _fqns(model)
    for param, state in optimizer.state.items():
        group = group_of[id(param)]
        _settle_8bit(state, shards.row_shard(param, names[id(param)]), _side(group, param), optimizer.plan(group).store,
                     saved_world)
    optimizer.skipped_steps = int(template[f"{prefix}{STATE_SEP}skipped_steps"])
    optimizer.forget_caches()
    _validate(optimizer, model)
    if wrapper is not optimizer:
        wrapper.after_load()
def _template(metadata: dict, by_name: dict, group_of: dict, saved: tuple, template: dict) -> list[tuple]:
    """Fill ``template`` with an empty tensor of each state key of the checkpoint (``saved``: its prefix
    and world size): this rank's share as a DTensor of the whole shape, or the whole tensor where
    the share cannot be read as saved (a plain parameter; 8-bit moments of another world size).
    Returns (key, parameter, state key) of every entry."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix, saved_world = saved
    head = f"{prefix}{STATE_SEP}state{STATE_SEP}"
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
        eight_bit = state_key in ABSMAX or dtype == torch.uint8
        if shard is None or (eight_bit and saved_world not in (None, shard.world)):
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
    return entries


def _restore_groups(optimizer: SubspaceAdamW, by_name: dict, saved_groups: str | None) -> None:
    """The groups' options from the checkpoint, after checking that they hold the same parameters."""
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


def _settle_8bit(state: dict, shard, side: str | None, store, saved_world: int | None) -> None:
    """Loaded 8-bit moments of a sharded parameter made this rank's: on the world size that saved them
    the padded block maxima cut to this share's blocks, on another the moments (loaded whole)
    requantized in this rank's blocks by ``store`` (see the module doc)."""
    if shard is None or not ABSMAX.intersection(state):
        return
    if saved_world in (None, shard.world):
        for moment_key, absmax_key in ABSMAX_KEYS.items():
            state[absmax_key] = state[absmax_key][:_blocks(state[moment_key].numel())].clone()
        return
    dim, size = shards.state_split(shard, side)
    offset, length = shards.chunk_span(size, shard.world, shard.rank)
    mine = []
    for moment_key, absmax_key in ABSMAX_KEYS.items():
        whole = _dequantized(state.pop(moment_key), state.pop(absmax_key), dim, saved_world, moment_key == EXP_AVG)
        mine.append(whole.narrow(dim, offset, length).clone())
    store.replace(state, *mine, (dim, size))


def _dequantized(quantized: torch.Tensor, absmax: torch.Tensor, dim: int, saved_world: int, signed: bool):
    """The whole fp32 moment from its whole 8-bit form saved by ``saved_world`` ranks: each saving
    rank's share (cut along ``dim``) dequantized with its own block maxima."""
    width = absmax.numel() // saved_world
    parts = []
    for rank in range(saved_world):
        offset, length = shards.chunk_span(quantized.shape[dim], saved_world, rank)
        share = quantized.narrow(dim, offset, length).contiguous()
        maxima = absmax[rank * width: rank * width + _blocks(share.numel())]
        parts.append(get_store("8bit").dequantize(share, maxima, signed))
    return torch.cat(parts, dim)


def _inner(optimizer) -> SubspaceAdamW:
    """The ``SubspaceAdamW`` of ``optimizer`` (a ``LayerwiseOptimizer``'s inner one)."""
    inner = optimizer.optimizer if isinstance(optimizer, LayerwiseOptimizer) else optimizer
    if not isinstance(inner, SubspaceAdamW):
        raise TypeError(f"expected a fullrank SubspaceAdamW (or preset, or a LayerwiseOptimizer over one), got "
                        f"{type(optimizer).__name__}; torch optimizers keep DTensor state: use "
                        "torch.distributed.checkpoint.state_dict for them")
    return inner


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
