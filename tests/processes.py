"""Processes for the multi-process tests, forked from one server per test process.

``torch.multiprocessing.spawn`` and ``torchrun`` start each process as a new interpreter that imports
torch, transformers and fullrank again: about 5 s of CPU per process before the first step, most of a
tiny run. Here the processes come from multiprocessing's *forkserver*, a clean interpreter (not a fork
of pytest) that imports those modules once and forks every later process from itself. Each process
starts with the test's environment (``os.environ`` at the call), as a spawned one would; what the
preloaded modules read from the environment at import (huggingface_hub's offline switch, say) they read
once, when the first call of this test process started the server.

- ``spawn(fn, args, nprocs)``: ``fn(rank, *args)`` in ``nprocs`` processes, like ``mp.spawn``.
- ``pretrain(argv, nproc, logs)``: ``fullrank pretrain`` on ``nproc`` ranks with the environment
  torchrun gives each of its processes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each
  rank's output goes to ``logs/rank<N>.log``. What only a real launcher shows (its exit status on every
  rank, the console) stays with the ``torchrun`` runs of tests/test_train_fsdp.py and test_train_ddp.py.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint",
           "transformers.models.llama.modeling_llama", "fullrank.optim", "fullrank.train.loop", "fullrank.cli"]
# where there is no forkserver (Windows), every process is spawned and imports for itself
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
if START_METHOD == "forkserver":
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)


def _in_environment(rank: int, environ: dict, fn, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def spawn(fn, args: tuple = (), nprocs: int = 1) -> None:
    """``fn(rank, *args)`` for each rank, joined; a process's exception is raised here with its traceback."""
    mp.start_processes(_in_environment, args=(dict(os.environ), fn, tuple(args)), nprocs=nprocs,
                       start_method=START_METHOD)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pretrain_rank(rank: int, world: int, port: int, argv: list, logs: str) -> None:
    log = open(Path(logs) / f"rank{rank}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TOKENIZERS_PARALLELISM="false")
    from fullrank.cli import main
    code = main(argv)
    if code != 0:
        raise SystemExit(code)


def pretrain(argv: list, nproc: int, logs: Path) -> None:
    """``fullrank pretrain ARGV`` on ``nproc`` ranks; a failing rank fails here with the end of its log."""
    logs.mkdir(parents=True, exist_ok=True)
    try:
        spawn(_pretrain_rank, (nproc, free_port(), [str(a) for a in argv], str(logs)), nprocs=nproc)
    except ProcessException as failure:
        tails = "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("rank*.log")))
        raise AssertionError(f"fullrank {' '.join(map(str, argv))} failed on {nproc} ranks: {failure}\n{tails}") from None
