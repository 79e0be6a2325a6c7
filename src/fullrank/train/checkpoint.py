"""Checkpoints: one ``torch.save`` file per saved step, holding tensors and plain Python values only,
so that ``torch.load(weights_only=True)`` reads them back.

``RUN_DIR/checkpoints/step_0001000.pt`` holds the model, the optimizer (moments and projections),
the scheduler, the data position, every process's RNG states, the step, the token count and the
config; the newest ``keep`` files are kept. A run with ``--fsdp`` writes a folder
``step_0001000/`` instead (``fsdp.py``: DCP shards and ``meta.pt`` with everything but the model
and the optimizer); the functions below treat both alike.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .._quiet import no_hub_progress_bars
from .errors import ConfigError

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")
_FOLDER = re.compile(r"^step_(\d+)$")
META = "meta.pt"  # of a checkpoint folder (--fsdp)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    found += [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FOLDER.match(p.name)) and (p / META).is_file()]
    return sorted(found)


def is_sharded(path: Path) -> bool:
    """A checkpoint folder written with ``--fsdp``."""
    return Path(path).is_dir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write atomically (temporary file, then rename) and delete all but the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (files, or folders written with ``--fsdp``)."""
    import shutil

    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path, *, lazy: bool = False) -> dict:
    """``torch.load(weights_only=True)`` onto the CPU; ``lazy`` memory-maps the file. For a checkpoint
    folder (``--fsdp``) its ``meta.pt``: everything but the model and the optimizer."""
    if is_sharded(path):
        path = Path(path) / META
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except Exception as err:  # unpickling errors, truncated files
        raise ConfigError(f"--resume: cannot read checkpoint '{path}': {str(err).strip().splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"--resume: '{path}' is not a fullrank checkpoint (format_version {FORMAT_VERSION})")
    return state


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_hf_model(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    """Write ``model`` (DDP unwrapped; a peft LoRA model merged into plain weights, on a copy) and
    ``tokenizer`` with ``save_pretrained``, so that ``AutoModelForCausalLM.from_pretrained(folder)``
    and ``AutoTokenizer.from_pretrained(folder)`` load them."""
    import copy

    folder = Path(folder)
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "merge_and_unload"):  # peft: LoRA/ReLoRA
        model = copy.deepcopy(model).merge_and_unload()
    with no_hub_progress_bars():
        model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
