"""Data parallelism: 2 CPU processes (torchrun, gloo) reach the weights of 1 process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

from fullrank.cli import main
from fullrank.train.checkpoint import latest_checkpoint, load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_two_processes_match_one(tmp_path):
    """Fira with a projection refresh, gradient accumulation (no_sync) and global clipping."""
    tiny = setup_tiny(tmp_path)
    common = dict(method="fira", max_steps=4, grad_accum=2, eval_every=2, update_proj_gap=2, grad_clip=1.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fullrank", *tiny_argv(tiny, tmp_path / "ddp", batch_size=1, **common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout

    assert main(tiny_argv(tiny, tmp_path / "single", batch_size=2, **common)) == 0

    ddp = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    single = load_checkpoint(latest_checkpoint(tmp_path / "single"))
    assert ddp["step"] == single["step"] == 4 and len(ddp["rng"]) == 2
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-5)
    assert ddp["data"] == single["data"]
