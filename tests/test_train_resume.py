"""Checkpoint and resume: the resumed run repeats the uninterrupted run's losses exactly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

from fullrank.cli import main
from fullrank.train.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return setup_tiny(tmp_path_factory.mktemp("tiny"))


def records(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


@pytest.mark.parametrize("method,extra", [
    ("fira", {"update_proj_gap": 4}),  # projections refreshed before and after the interruption
    ("relora", {"relora_every": 4, "relora_warmup": 2, "lora_dropout": 0.1}),  # restarts and dropout RNG
])
def test_resume_repeats_losses_exactly(method, extra, tiny, tmp_path):
    full = tmp_path / "full"
    argv = tiny_argv(tiny, full, method=method, max_steps=12, save_every=6, keep_checkpoints=3,
                     eval_every=6, allow_repeat=True, **extra)
    assert main(argv) == 0
    assert [s for s, _ in list_checkpoints(full)] == [6, 12]

    # simulate an interruption after step 6: the last checkpoint is gone, the log ran further
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_0000012.pt").unlink()
    (cut / "summary.json").unlink()
    assert main(["pretrain", "--resume", str(cut), "--no-progress"]) == 0

    expected = [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in records(full, "train")]
    resumed = [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in records(cut, "train")]
    assert resumed == expected  # steps 7..12 recomputed, bit for bit; no duplicated records
    assert [r["val_loss"] for r in records(cut, "eval")] == [r["val_loss"] for r in records(full, "eval")]
    a = load_checkpoint(full / "checkpoints" / "step_0000012.pt")
    b = load_checkpoint(cut / "checkpoints" / "step_0000012.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["data"] == b["data"]


def test_checkpoint_holds_plain_types_only(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=3, eval_every=0)) == 0
    (step, path), = list_checkpoints(out)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert step == 3 and state["step"] == 3 and state["config"]["optim"]["method"] == "fira"
    assert set(state) >= {"model", "optimizer", "scheduler", "data", "rng", "tokens", "config"}
    assert state["data"]["doc"] >= 0 and state["optimizer"]["state"]


def test_a_checkpoint_with_a_flat_config_resumes(tiny, tmp_path):
    """Checkpoints of earlier versions hold the config flat (``lr``, not ``optim: {lr}``)."""
    from fullrank.train.config import from_dict

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(tiny_argv(tiny, full, max_steps=4, eval_every=0)) == 0
    assert main(tiny_argv(tiny, cut, max_steps=2, schedule_steps=4, eval_every=0, save_every=2)) == 0
    (_, path), = list_checkpoints(cut)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["config"] = from_dict(state["config"], "test").flat()
    assert "lr" in state["config"] and "optim" not in state["config"]
    torch.save(state, path)
    assert main(["pretrain", "--resume", str(cut), "--max-steps", "4", "--no-progress"]) == 0
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(full, "train")]


def test_resume_of_a_finished_run_changes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=3, eval_every=0)) == 0
    before = records(out, "train")
    assert main(["pretrain", "--resume", str(out), "--no-progress"]) == 0
    assert records(out, "train") == before


def test_ctrl_c_saves_and_resume_finishes_the_run(tiny, tmp_path, monkeypatch, capsys):
    import signal

    from fullrank.train import loop

    full = tmp_path / "full"
    assert main(tiny_argv(tiny, full, max_steps=6, eval_every=0)) == 0

    real_step = loop.optimizer_step

    def step_then_ctrl_c(run, params, step):
        out = real_step(run, params, step)
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C was pressed during step 3
        return out

    monkeypatch.setattr(loop, "optimizer_step", step_then_ctrl_c)
    cut = tmp_path / "cut"
    assert main(tiny_argv(tiny, cut, max_steps=6, eval_every=0)) == 130
    assert "checkpoint saved after step 3" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(cut)] == [3]
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert main(["pretrain", "--resume", str(cut), "--no-progress"]) == 0
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(full, "train")]
