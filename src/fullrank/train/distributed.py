"""Data-parallel training through ``torchrun``: process group (nccl on GPU, gloo on CPU) and helpers.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs in one process and the
helpers are no-ops.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {pref}: CUDA is not available on this machine; allowed: auto, cpu")
        device = torch.device(pref if ":" in pref else f"cuda:{local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {pref}: no such GPU; allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def setup(device_pref: str, single_process_group: bool = False) -> DistEnv:
    """Read torchrun's environment, choose the device and start the process group if needed (also for
    one process when ``single_process_group``: FSDP2 needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if (world > 1 or single_process_group) and not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("torch.distributed is not available in this build of PyTorch (needed by torchrun and --fsdp)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # one process without torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank, local_rank, world, device)


def cleanup(synchronize: bool = False) -> None:
    """Free what is left of the run, then destroy every process group (after a barrier when
    ``synchronize``): gloo's pending work must not outlive the group, or be freed while the
    interpreter shuts down (a SIGABRT at exit: ``terminate called without an active exception``)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
