"""End-to-end ``fullrank finetune`` on a tiny model: learning, errors, resume, outputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fullrank.cli import main
from fullrank.finetune.training import finetune
from fullrank.train.errors import ConfigError
from finetune_fixtures import tiny_model_dir, write_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    return tiny_model_dir(root / "model"), write_task(root / "data", "keys", n_train=400, n_test=60)


def _values(setup, tmp_path, **kw):
    model, data = setup
    values = dict(model=str(model), train=["keys"], eval=["keys"], data_dir=str(data), max_steps=60, warmup_steps=5,
                  batch_size=16, micro_batch_size=16, rank=8, lr=5e-3, out_dir=str(tmp_path / "run"), progress=False,
                  save_every=0, save_model=False, threads=1)
    return {**values, **kw}


@pytest.mark.parametrize("method, lr", [("fira", 5e-3), ("galore", 5e-3), ("adamw", 5e-3), ("lora", 1e-2)])
def test_learns_a_synthetic_task_well_above_chance(setup, tmp_path, method, lr):
    summary = finetune(_values(setup, tmp_path, method=method, lr=lr))
    # three options: chance is 1/3; a broken loss mask or scorer stays near it
    assert summary["accuracy"]["generate"]["keys"] >= 0.8
    assert summary["accuracy"]["likelihood"]["keys"] >= 0.8
    assert summary["average"]["likelihood"] == summary["accuracy"]["likelihood"]["keys"]
    assert summary["steps"] == 60 and summary["optimizer_state_bytes"] > 0 and summary["tokens"] > 0


def test_outputs_and_exact_resume(setup, tmp_path):
    values = _values(setup, tmp_path, method="fira", max_steps=8, save_every=4, save_model=True)
    run = tmp_path / "run"
    first = finetune(values)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "predictions.jsonl", "hf_model/config.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["accuracy"] == first["accuracy"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    assert sorted(losses) == list(range(1, 9))
    shutil.rmtree(run / "checkpoints" / "checkpoint-8")
    resumed = finetune({}, resume=str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    assert again == losses  # steps 1-4 kept, 5-8 recomputed from checkpoint-4: identical
    assert resumed["accuracy"] == first["accuracy"]
    assert sum(r["type"] == "accuracy" for r in records) == 2  # one per scoring, not duplicated


def test_the_saved_model_chains_into_another_finetune(setup, tmp_path):
    finetune(_values(setup, tmp_path, method="adamw", max_steps=2, save_model=True, scoring=["likelihood"]))
    again = finetune(_values(setup, tmp_path, method="adamw", max_steps=2, scoring=["likelihood"],
                             model=str(tmp_path / "run"), out_dir=str(tmp_path / "run2")))
    assert again["steps"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--train", "nope"], "--train: task 'nope' is unknown"),
    (["--eval", "keys,piqa"], "--eval: task 'piqa' has no file there"),
    (["--method", "adam8bit"], "--method: unknown method 'adam8bit'"),
    (["--batch-size", "10", "--micro-batch-size", "4"], "--batch-size: must be a multiple"),
    (["--lora-dropout", "2"], "--lora-dropout must be a number in [0.0, 1.0), got 2.0"),
    (["--scoring", "exact"], "--scoring: allowed: generate, likelihood"),
    (["--target-modules", "nothing_here"], "--target-modules: nothing_here matches no nn.Linear"),
])
def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys, flags, message):
    model, data = setup
    argv = ["finetune", "--model", str(model), "--data-dir", str(data), "--train", "keys", "--eval", "keys",
            "--out-dir", str(tmp_path / "run"), "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "run").exists()


def test_models_that_are_missing_or_not_causal_lms(setup, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    with pytest.raises(ConfigError, match="--model: '.*absent' does not exist"):
        finetune(_values(setup, tmp_path, model=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        finetune(_values(setup, tmp_path, model=str(tmp_path / "empty")))
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="is not a causal language model"):
        finetune(_values(setup, tmp_path, model=str(tmp_path / "t5")))
    with pytest.raises(ConfigError, match=r"--resume: .*\(no config.yaml\)"):
        finetune({}, resume=str(tmp_path / "empty"))
