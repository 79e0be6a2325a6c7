"""``fullrank pretrain --fsdp``: 2 CPU processes (gloo) train what 1 process trains, resume exactly from
their DCP checkpoints, and resume on 1 process; ``--fsdp --layerwise`` (each weight's shard updated in
backward) trains what ``--fsdp`` trains and resumes exactly. The first run of each kind goes through
``torchrun`` (its exit status on every rank included), the others through tests/processes.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from processes import pretrain
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

from fullrank.cli import main
from fullrank.train.checkpoint import latest_checkpoint, list_checkpoints

SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)
COMMON = dict(method="fira", grad_accum=2, eval_every=2, update_proj_gap=2, grad_clip=1.0, schedule_steps=4,
              save_every=2)


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def forked(tiny, out: Path, logs: Path, **flags) -> None:
    """The same 2-rank run as ``torchrun``, its processes forked from tests/processes.py's server."""
    pretrain(tiny_argv(tiny, out, **flags), 2, logs)


def torchrun(tiny, out: Path, **flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fullrank", *tiny_argv(tiny, out, **flags)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").state_dict()


def copy_run_at(source: Path, target: Path, step: int) -> None:
    """``target``: the run ``source`` as it was when its checkpoint of ``step`` was written."""
    import shutil
    (target / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(source / name, target / name)
    shutil.copytree(dict(list_checkpoints(source))[step], target / "checkpoints" / f"step_{step:07d}")
    lines = (target / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_train")
    tiny = setup_tiny(tmp)
    torchrun(tiny, tmp / "fsdp", batch_size=1, max_steps=4, fsdp=True, **COMMON)
    assert main(tiny_argv(tiny, tmp / "single", batch_size=2, max_steps=4, **COMMON)) == 0
    copy_run_at(tmp / "fsdp", tmp / "resumed", 2)
    forked(tiny, None, tmp / "logs", batch_size=1, max_steps=4, fsdp=True, **COMMON, resume=tmp / "resumed")
    return tiny, tmp


def test_two_sharded_processes_train_what_one_process_trains(runs):
    """Fira with refreshes, gradient accumulation (gradient sync on the last micro-batch only) and
    global clipping: the same losses and the same exported weights as one unsharded process."""
    _, tmp = runs
    assert train_losses(tmp / "fsdp") == pytest.approx(train_losses(tmp / "single"), rel=1e-5)
    single = weights(tmp / "single")
    for key, value in weights(tmp / "fsdp").items():
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoints_are_dcp_folders(runs):
    _, tmp = runs
    found = list_checkpoints(tmp / "fsdp")
    assert [step for step, _ in found] == [2, 4]
    for _, folder in found:
        assert folder.is_dir() and (folder / "meta.pt").is_file()
        assert len(list(folder.glob("*.distcp"))) == 2  # one file of shards per process
    assert not list((tmp / "fsdp" / "checkpoints").glob("*.tmp"))


def test_resume_continues_with_identical_losses(runs):
    _, tmp = runs
    assert train_losses(tmp / "resumed") == train_losses(tmp / "fsdp")


def test_resume_on_one_process(runs):
    """The 2-process checkpoint of step 2, resharded onto 1 process at the same global batch."""
    tiny, tmp = runs
    one = tmp / "one"
    copy_run_at(tmp / "fsdp", one, 2)
    assert main(tiny_argv(tiny, None, resume=one, batch_size=2, max_steps=4, fsdp=True, **COMMON)) == 0
    assert train_losses(one) == pytest.approx(train_losses(tmp / "fsdp"), rel=1e-5)
    assert latest_checkpoint(one).name == "step_0000004"


def test_resume_at_another_global_batch_is_refused(runs, capsys):
    tiny, tmp = runs
    code = main(tiny_argv(tiny, None, resume=tmp / "fsdp", batch_size=1, max_steps=6, fsdp=True, **COMMON))
    assert code != 0
    assert "--batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (dict(fsdp=True, layerwise=True, grad_clip=1.0), "--grad-clip must be 0 with --layerwise"),
    (dict(fsdp=True, method="lora"), "LoRA"),
    (dict(fsdp=True, probe="spikes"), "--probe"),
])
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, capsys, flags, message):
    tiny = setup_tiny(tmp_path)
    assert main(tiny_argv(tiny, tmp_path / "run", **flags)) != 0
    assert message in capsys.readouterr().err


LAYERWISE = dict(COMMON, grad_clip=0.0)  # (global clipping needs every gradient before the first update)


@pytest.fixture(scope="module")
def layerwise_runs(tmp_path_factory):
    """``--fsdp --layerwise`` with gradient accumulation; ``--fsdp`` with the default buckets and with
    one matrix per bucket; the layer-wise run resumed from its checkpoint of step 2."""
    tmp = tmp_path_factory.mktemp("fsdp_layerwise_train")
    tiny = setup_tiny(tmp)
    torchrun(tiny, tmp / "layerwise", batch_size=1, max_steps=4, fsdp=True, layerwise=True, **LAYERWISE)
    forked(tiny, tmp / "stacked", tmp / "logs_stacked", batch_size=1, max_steps=4, fsdp=True, **LAYERWISE)
    forked(tiny, tmp / "per_matrix", tmp / "logs_per_matrix", batch_size=1, max_steps=4, fsdp=True,
           optim_arg="bucket_cap_mb=0", **LAYERWISE)
    copy_run_at(tmp / "layerwise", tmp / "resumed", 2)
    forked(tiny, None, tmp / "logs_resumed", batch_size=1, max_steps=4, fsdp=True, layerwise=True, **LAYERWISE,
           resume=tmp / "resumed")
    return tmp


def test_layerwise_on_shards_trains_what_the_sharded_step_trains(layerwise_runs):
    """Bit for bit: on the CPU a sharded group's buckets stack its same-shape matrices (256 MiB), and
    a stacked bucket's update is assembled in the gradient stack and written by ``_foreach`` ops —
    the arithmetic of a layer-wise step, whose masked one-matrix write (the mask must reach the
    decay and both terms) is the same assembled write."""
    tmp = layerwise_runs
    assert train_losses(tmp / "layerwise") == train_losses(tmp / "stacked")
    stacked = weights(tmp / "stacked")
    for key, value in weights(tmp / "layerwise").items():
        assert torch.equal(value, stacked[key]), key


def test_layerwise_on_shards_against_one_matrix_per_bucket(layerwise_runs):
    """``bucket_cap_mb=0``: the ordinary step writes a lone matrix's update factored (one ``addmm_``
    with the decay as β and one ``addcmul_``: no m×n temporary), which a masked layer-wise step
    cannot use (``addmm_``'s α and β are host numbers, the mask is on the device): the same update,
    rounded in another order, so equal up to fp32 rounding, not bit for bit."""
    tmp = layerwise_runs
    assert train_losses(tmp / "layerwise") == pytest.approx(train_losses(tmp / "per_matrix"), rel=1e-6)
    per_matrix = weights(tmp / "per_matrix")
    for key, value in weights(tmp / "layerwise").items():
        torch.testing.assert_close(value, per_matrix[key], rtol=1e-5, atol=1e-6, msg=key)


def test_layerwise_on_shards_resumes_exactly(layerwise_runs):
    tmp = layerwise_runs
    assert train_losses(tmp / "resumed") == train_losses(tmp / "layerwise")
    layerwise = weights(tmp / "layerwise")
    for key, value in weights(tmp / "resumed").items():
        assert torch.equal(value, layerwise[key]), key
