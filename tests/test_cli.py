"""``fullrank`` command line: help, plot, and bad input reported as one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

from fullrank.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return setup_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(tiny_argv(tiny, out, max_steps=4, eval_every=2, save_every=2)) == 0
    return out


def run_error(capsys, argv) -> str:
    """Run ``main(argv)``, check exit status 2 and a single stderr line without a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fullrank: error: ")
    return lines[0]


def with_flags(tiny, out, **flags):
    return tiny_argv(tiny, out, **flags)


@pytest.mark.parametrize("flags,expected", [
    ({"model": "llama_5b"}, ["--model", "llama_5b", "llama_tiny", "llama_60m", "llama_7b"]),
    ({"model": "missing/config.json"}, ["--model", "does not exist"]),
    ({"method": "adam8bit"}, ["--method", "adam8bit", "adamw", "galore", "fira", "relora"]),
    ({"rank": 33}, ["--rank 33", "allowed: 1..32"]),
    ({"rank": 0}, ["--rank", "[1, inf)"]),
    ({"seq_len": 65}, ["--seq-len 65", "max_position_embeddings", "2..64"]),
    ({"lr": -1.0}, ["--lr", "(0.0, inf)"]),
    ({"warmup_ratio": 1.0}, ["--warmup-ratio", "[0.0, 1.0)"]),
    ({"data": "nowhere.jsonl"}, ["--data", "nowhere.jsonl", "does not exist", ".parquet"]),
    ({"val_data": "nowhere"}, ["--val-data", "does not exist"]),
    ({"tokenizer": "./no/such/tokenizer"}, ["--tokenizer", "does not exist"]),
    ({"proj_type": "diagonal"}, ["proj_type", "std", "reverse_std"]),
    ({"device": "tpu"}, ["--device", "cpu", "cuda"]),
    ({"optim_arg": "gamma=0.5"}, ["gamma", "0.5"]),
    ({"optim_arg": "colour=blue"}, ["--optim-arg colour", "method 'fira'", "gamma", "--help-optim"]),
    ({"optim_arg": "gama=1.01"}, ["--optim-arg gama", "did you mean 'gamma'"]),
    ({"method": "adamw", "optim_arg": "gamma=1.01"}, ["--optim-arg gamma", "method 'adamw'", "amsgrad"]),
    ({"recipe": "papr"}, ["--recipe", "did you mean 'paper'", "auto, paper, cpu"]),
    ({"max_steps": 0}, ["--max-steps", "[1, inf)"]),
    ({"optim_arg": "eps=1e-7"}, ["--optim-arg eps", "use --eps"]),
    ({"optim_arg": "betas=0.9"}, ["--optim-arg betas", "use --beta1 and --beta2"]),
    ({"target_modules": "conv"}, ["--target-modules", "conv"]),
])
def test_bad_input_is_one_line(flags, expected, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    line = run_error(capsys, with_flags(tiny, out, **flags))
    for word in expected:
        assert word in line, line
    assert not out.exists()  # nothing written for bad input


def test_bad_flag_values_and_keys(tiny, tmp_path, capsys):
    assert "--rank" in run_error(capsys, ["pretrain", "--rank", "abc"])
    line = run_error(capsys, ["pretrain", "--colour", "blue"])
    assert line == "fullrank: error: unrecognized arguments: --colour blue"  # one prefix, not "fullrank: error: fullrank: ..."
    assert run_error(capsys, ["pretrain", "--optim-arg", "gamma"]).count("fullrank") == 1
    assert "required" in run_error(capsys, [])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: llama_tiny\nlearning_rate: 0.1\n")
    line = run_error(capsys, ["pretrain", "--config", cfg])
    assert "learning_rate" in line and "allowed keys" in line and "lr" in line
    cfg.write_text("model: llama_tiny\nmax_step: 10\n")
    assert "unknown key 'max_step' (did you mean 'max_steps'?)" in run_error(capsys, ["pretrain", "--config", cfg])
    cfg.write_text("rank: sixteen\n")
    assert "'rank' must be an integer" in run_error(capsys, ["pretrain", "--config", cfg])
    assert "does not exist" in run_error(capsys, ["pretrain", "--config", tmp_path / "none.yaml"])


def test_empty_and_unreadable_corpora(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no non-empty text" in run_error(capsys, with_flags(tiny, tmp_path / "a", data=empty))
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"this is not gzip")
    assert "cannot read" in run_error(capsys, with_flags(tiny, tmp_path / "b", data=broken))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    assert "no string field 'text'" in run_error(capsys, with_flags(tiny, tmp_path / "c", data=notext))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("hello")
    assert "holds no corpus file" in run_error(capsys, with_flags(tiny, tmp_path / "d", data=folder))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a single document"}\n')  # all of it goes to the validation split
    line = run_error(capsys, with_flags(tiny, tmp_path / "e", data=one, val_data=None))
    assert "validation split" in line
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    assert "fewer than 32 tokens" in run_error(capsys, with_flags(tiny, tmp_path / "f", val_data=short))


def test_existing_run_dir_needs_overwrite(tiny, finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    line = run_error(capsys, tiny_argv(tiny, finished_run, max_steps=2))
    assert "already exists" in line and "--overwrite" in line and "--resume" in line
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before


def test_resume_with_a_different_config(tiny, finished_run, tmp_path, capsys):
    line = run_error(capsys, ["pretrain", "--resume", finished_run, "--rank", "4"])
    assert "different config" in line and "rank=8 (saved) vs 4 (given)" in line
    line = run_error(capsys, ["pretrain", "--resume", finished_run, "--method", "galore", "--lr", "0.5"])
    assert "method='fira' (saved)" in line and "lr=0.01 (saved)" in line
    assert "holds no checkpoint" in run_error(capsys, ["pretrain", "--resume", tmp_path])
    assert "does not exist" in run_error(capsys, ["pretrain", "--resume", tmp_path / "nope"])


def test_overwrite_replaces_a_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=3, eval_every=0)) == 0
    assert main(tiny_argv(tiny, out, max_steps=2, eval_every=0, overwrite=True)) == 0
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002.pt"]


def test_yaml_config_and_flag_override(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths in the config resolve against the current directory
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {tiny['model']}\nmethod: galore\nrank: 4\nmax_steps: 3\nseq_len: 32\nbatch_size: 2\n"
        f"grad_accum: 1\ndata: {os.path.relpath(tiny['data'], tmp_path)}\nval_data: {tiny['val']}\n"
        f"tokenizer: {tiny['tokenizer']}\neval_tokens: 64\nout_dir: runs/yaml\noptim_args: {{seed: 3, gamma: inf}}\n"
        "lr: 1e-3\n"  # YAML 1.1 reads 1e-3 and inf as strings: they must still be numbers
    )
    assert main(["pretrain", "--config", str(cfg), "--max-steps", "2", "--no-progress", "--optim-arg", "refresh_beta=1e-1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "final val ppl" in out
    import yaml

    saved = yaml.safe_load((tmp_path / "runs" / "yaml" / "config.yaml").read_text())  # by section
    assert set(saved) == {"model", "data", "optim", "precision", "run"}
    assert saved["run"]["max_steps"] == 2 and saved["optim"]["method"] == "galore" and saved["optim"]["rank"] == 4
    assert saved["data"]["data"] == str(Path(tiny["data"]).resolve()) and saved["optim"]["lr"] == 1e-3
    assert saved["optim"]["optim_args"] == {"seed": 3, "gamma": float("inf"), "refresh_beta": 0.1}
    # the saved file is a config again (by section), and a section may be given in a config file too
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({**saved, "run": {**saved["run"], "out_dir": "runs/again", "max_steps": 1}}))
    assert main(["pretrain", "--config", str(again), "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "again" / "config.yaml").read_text())["optim"] == saved["optim"]


def test_plot_overlays_runs(finished_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", str(finished_run), str(finished_run), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no metrics.jsonl" in run_error(capsys, ["plot", tmp_path])
    monkeypatch.chdir(tmp_path)  # the default output goes next to the first run, never into the current directory
    assert main(["plot", str(finished_run), str(finished_run)]) == 0
    assert (finished_run / "loss_curves.png").is_file() and not (tmp_path / "loss_curves.png").exists()


def test_version_and_help_optim(capsys):
    import fullrank

    with pytest.raises(SystemExit) as exit_info:
        from fullrank.cli import build_parser

        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fullrank {fullrank.__version__}"
    assert main(["pretrain", "--help-optim"]) == 0
    text = capsys.readouterr().out
    sections = {line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")}
    assert {"adamw", "fira", "galore", "adarankgrad", "apollo"} <= sections
    assert "gamma (1.01)" in text and "rank_energy" in text and "apollo_scale" in text and "amsgrad" in text


def test_summary_compares_the_state_with_adamw(finished_run, tiny, tmp_path, capsys):
    import json

    fira = json.loads((finished_run / "summary.json").read_text())["memory"]
    assert fira["projected_state_bytes"] < 0.7 * fira["projected_adamw_state_bytes"]
    assert fira["state_bytes"] < fira["adamw_state_bytes"]
    assert fira["projected_matrices"] == 14 and 0 < fira["projected_parameter_share"] < 1
    out = tmp_path / "adamw"
    assert main(tiny_argv(tiny, out, method="adamw", lr=1e-3, max_steps=2, eval_every=0)) == 0
    printed = capsys.readouterr().out
    adamw = json.loads((out / "summary.json").read_text())["memory"]
    # the computed AdamW figure is what torch.optim.AdamW really holds
    assert adamw["state_bytes"] == adamw["adamw_state_bytes"]
    assert adamw["projected_state_bytes"] == adamw["projected_adamw_state_bytes"]
    assert "state, projected" in printed and "for AdamW: 0% less" in printed


def test_help_and_module_entry_point(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    help_text = subprocess.run([sys.executable, "-m", "fullrank", "pretrain", "--help"], env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0
    for flag in ("--model", "--method", "--rank", "--data", "--val-data", "--tokenizer", "--resume", "--overwrite",
                 "--allow-repeat", "--eval-every", "--save-every", "--relora-every", "--grad-accum", "internet"):
        assert flag in help_text.stdout, flag
    offline = subprocess.run(
        [sys.executable, "-m", "fullrank", "pretrain", "--model", "llama_tiny", "--data", "c4",
         "--tokenizer", str(tiny["tokenizer"]), "--out-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1 and "--data c4" in offline.stderr and "internet" in offline.stderr
