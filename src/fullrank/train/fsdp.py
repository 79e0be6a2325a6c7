"""``fullrank pretrain --fsdp``: the model sharded by FSDP2 (``fully_shard``), checkpoints through
``torch.distributed.checkpoint`` (DCP).

* Every decoder layer is its own FSDP unit, the root holds the embeddings, the final norm and the
  head. Each process keeps ⌈m/w⌉ rows of every weight, its gradient and its share of the optimizer
  state (``fullrank.optim.sharding``); the fullrank optimizers project whole matrices, so the run
  trains what one process would. On a GPU the policy computes in bf16 from fp32 master weights and
  reduces gradients in fp32 (``MixedPrecisionPolicy``); on a CPU everything is fp32.
* Gradient accumulation reduce-scatters only on the last micro-batch
  (``set_requires_gradient_sync``).
* A checkpoint is a folder ``checkpoints/step_NNNNNNN/``: the DCP shards of the model and the
  optimizer (each process writes its own), and ``meta.pt`` (step, scheduler, data position, RNG
  states, config) from the main process. It is written under a temporary name and renamed when every
  process has finished, so a folder with ``meta.pt`` is complete. DCP reshards on load: a run
  resumes on another number of processes when its global batch (``batch_size`` × processes) is
  unchanged.
* The exported Hugging Face model is gathered whole on the main process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError

from .checkpoint import META


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool | None = None,
                mesh=None) -> torch.nn.Module:
    """``fully_shard`` the input embedding, each decoder layer, the final norm with the output layer,
    then the root (in place), as torchtitan does: the embedding and ``lm_head`` (a 7B model's largest
    matrices) are then gathered whole only while they compute, not for the whole step. The output
    unit stays gathered from its forward to its backward, which comes right after. Tied embeddings
    stay in the root. ``bf16`` (default: on a GPU): compute in bf16 from the sharded weights, reduce
    gradients in fp32. ``mesh``: the 1-D ``DeviceMesh`` to shard over (default: fully_shard's, every
    process; ``fullrank memory`` passes the mesh of its fake process group, made outside
    ``FakeTensorMode``)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}") from None

    bf16 = device.type == "cuda" if bf16 is None else bf16
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError("--fsdp: the model has no model.layers (a LLaMA-style decoder) to shard")
    decoder = model.model
    embedding, norm, output = (getattr(decoder, "embed_tokens", None), getattr(decoder, "norm", None),
                               getattr(model, "lm_head", None))
    untied = embedding is not None and output is not None and embedding.weight is not output.weight
    if untied:
        fully_shard(embedding, mesh=mesh, mp_policy=policy)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if untied:
        fully_shard([m for m in (norm, output) if m is not None], mesh=mesh, mp_policy=policy,
                    reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Reduce-scatter the gradients on this backward (``sync``) or keep accumulating them locally."""
    model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The DCP state of the model and the optimizer (fullrank's own layout, or torch's for AdamW)."""
    from fullrank.optim import LayerwiseOptimizer, SubspaceAdamW
    from fullrank.optim.distributed.checkpoint import distributed_state_dict

    if isinstance(optimizer, (SubspaceAdamW, LayerwiseOptimizer)):
        return {"model": model.state_dict(), **distributed_state_dict(optimizer, model)}
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save(folder: Path, model, optimizer, meta: dict | None, main: bool) -> Path:
    """Write the checkpoint folder (collective: every process calls it; ``meta`` from the main one)."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.with_name(folder.name + ".tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    if main:
        torch.save(meta, tmp / META)
    dist.barrier()
    if main:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    dist.barrier()
    return folder


def load(folder: Path, model, optimizer) -> None:
    """Load the model and the optimizer from a checkpoint folder, resharded to this world size."""
    import torch.distributed.checkpoint as dcp

    from fullrank.optim import LayerwiseOptimizer, SubspaceAdamW
    from fullrank.optim.distributed.checkpoint import load_distributed_state_dict

    if isinstance(optimizer, (SubspaceAdamW, LayerwiseOptimizer)):
        model_state = model.state_dict()
        dcp.load({"model": model_state}, checkpoint_id=str(folder))
        load_distributed_state_dict(optimizer, model, folder)
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    materialize_state(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh torch-style optimizer its whole state (one step at lr 0 on zero gradients), so that
    the template DCP loads into has every key. (torch's own helper does this only for an empty state;
    Flora keeps its projection seeds in the state from the start.)"""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(any(isinstance(v, torch.Tensor) for v in optimizer.state.get(p, {}).values()) for p in params):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def full_model_state(model: torch.nn.Module) -> dict:
    """Every weight whole, on the CPU of the main process (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
