"""``fullrank pretrain`` as a new user meets it: defaults, threads, Ctrl-C, resume and extension,
TensorBoard, the exported Hugging Face model, the rank plot."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

import fullrank
from fullrank.cli import main
from fullrank.train import config as C
from fullrank.train.checkpoint import list_checkpoints, load_checkpoint

PACKAGE_ROOT = Path(fullrank.__file__).resolve().parents[1]  # the folder that holds the imported package


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return setup_tiny(tmp_path_factory.mktemp("tiny"))


def records(run_dir, kind):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


def test_recipe_defaults_fit_the_device():
    cpu = C.finalize(C.build({"model": "llama_tiny", "device": "cpu"}))
    assert (cpu.data.batch_size, cpu.data.grad_accum, cpu.data.eval_tokens) == (4, 1, 16_384)
    paper = C.finalize(C.build({"model": "llama_tiny", "device": "cpu", "recipe": "paper"}))
    assert (paper.data.batch_size, paper.data.grad_accum, paper.data.eval_tokens) == (64, 8, 10_000_000)
    assert C.finalize(C.build({"model": "llama_60m", "device": "cuda"})).data.grad_accum == 8  # auto on a GPU: paper
    explicit = C.finalize(C.build({"model": "llama_tiny", "device": "cpu", "recipe": "paper", "batch_size": 2}))
    assert (explicit.data.batch_size, explicit.data.grad_accum) == (2, 8)
    assert cpu.optim.schedule_steps is None  # follows max_steps, also when a saved config.yaml is rerun with another


def _cpu_use(monkeypatch, percent, cores=2):
    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: percent)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("percent, processes, expected", [(100.0, 1, 1), (50.0, 1, 1), (20.0, 1, 1), (10.0, 1, 2), (3.0, 1, 2),
                                                          (3.0, 2, 1), (100.0, 2, 1)])
def test_auto_threads_take_the_cores_free_now(monkeypatch, percent, processes, expected):
    """The CPU use sampled now (not the load average a finished job leaves), shared by the processes."""
    from fullrank.train.threads import choose_threads

    _cpu_use(monkeypatch, percent)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # (ignored)
    threads, why = choose_threads(0, processes)
    assert threads == expected
    assert why.startswith(f"auto: {2 * (1 - percent / 100):.1f} of 2 cores free")
    assert choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a limit set from outside is kept
    assert choose_threads(0, processes)[0] == 1


def test_an_evaluation_cut_short_runs_on_resume_with_the_first_sessions_threads(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C twice during the step-2 evaluation: the last completed step is saved, the evaluation is
    lost; the resume (on a machine idle by then) keeps the first session's thread count, evaluates
    step 2 first, and the summary's training time is within its wall time over both sessions."""
    from fullrank.train import loop

    full = tmp_path / "full"
    assert main(tiny_argv(tiny, full, max_steps=6, eval_every=2)) == 0
    real_evaluate = loop.evaluate

    def ctrl_c_twice(run):
        signal.raise_signal(signal.SIGINT)  # asks to stop after the step
        signal.raise_signal(signal.SIGINT)  # stops at once, inside the evaluation
        return real_evaluate(run)

    _cpu_use(monkeypatch, 100.0)  # busy: auto picks 1 thread
    monkeypatch.setattr(loop, "evaluate", ctrl_c_twice)
    cut = tmp_path / "cut"
    assert main(tiny_argv(tiny, cut, max_steps=6, eval_every=2, threads=0)) == 130
    assert "saved the last completed step 2" in capsys.readouterr().err
    assert not records(cut, "eval")
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    _cpu_use(monkeypatch, 0.0)  # idle now: auto alone would pick 2
    assert main(["pretrain", "--resume", str(cut), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "CPU threads: 1 (the run's first session's" in out
    assert [r["step"] for r in records(cut, "eval")] == [2, 4, 6]
    assert [r["val_loss"] for r in records(cut, "eval")] == [r["val_loss"] for r in records(full, "eval")]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["threads"] == 1
    assert 0 < summary["train_time_s"] <= summary["wall_time_s"]


def test_ctrl_c_during_an_evaluation_stops_after_it(tiny, tmp_path, monkeypatch, capsys):
    """One Ctrl-C during the step-2 evaluation: it finishes and is logged, the run saves step 2 and
    stops there (it does not train step 3 first)."""
    from fullrank.train import loop

    real_evaluate = loop.evaluate

    def ctrl_c_once(run):
        if not records(run.run_dir, "eval"):
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(run)

    monkeypatch.setattr(loop, "evaluate", ctrl_c_once)
    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=6, eval_every=2)) == 130
    assert "checkpoint saved after step 2" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert [r["step"] for r in records(out, "eval")] == [2] and len(records(out, "train")) == 2


def test_resume_of_a_finished_run_is_a_no_op_and_max_steps_extends_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=4, eval_every=2, save_every=2, warmup_ratio=0.25, min_lr_ratio=0.1)) == 0
    summary, log = (out / "summary.json").read_bytes(), (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(out), "--no-progress"]) == 0
    assert "already finished 4 of 4 steps: nothing to do" in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == summary and (out / "metrics.jsonl").read_bytes() == log

    assert main(["pretrain", "--resume", str(out), "--max-steps", "7", "--no-progress"]) == 0
    assert "lr schedule planned for 4 steps" in capsys.readouterr().out
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 8))
    assert [r["lr"] for r in train[4:]] == pytest.approx([0.1 * 1e-2] * 3)  # the original cosine's floor
    assert [r["step"] for r in records(out, "eval")] == [2, 4, 6, 7]
    assert json.loads((out / "summary.json").read_text())["steps"] == 7
    assert [s for s, _ in list_checkpoints(out)][-1] == 7

    capsys.readouterr()
    assert main(["pretrain", "--resume", str(out), "--max-steps", "5"]) == 2
    assert "--max-steps 5 is below the 7 steps" in capsys.readouterr().err
    # --schedule-steps on an extension re-plans the cosine over the new horizon instead
    assert main(["pretrain", "--resume", str(out), "--max-steps", "9", "--schedule-steps", "9", "--no-progress"]) == 0
    lr8 = [r["lr"] for r in records(out, "train")][7]
    assert lr8 > 0.1 * 1e-2 * 1.5


def test_tensorboard_events_and_no_rank_plot_for_a_fixed_rank(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(tiny_argv(tiny, out, max_steps=4, eval_every=2)) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/ppl"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in records(out, "train")])
    assert not (out / "rank.png").exists()  # every rank stayed 8: a rank plot would be a flat line
    assert main([*tiny_argv(tiny, tmp_path / "off", max_steps=1), "--no-tensorboard"]) == 0
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_rank_plot_only_when_ranks_change(tmp_path):
    from fullrank.train.plot import plot_ranks, ranks_changed

    def write(run, ranks_by_step):
        run.mkdir()
        rows = [{"type": "train", "step": s, "loss": 1.0, "ranks": r} for s, r in ranks_by_step]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    fixed = write(tmp_path / "fixed", [(1, {"a": 4, "b": 4}), (2, {"a": 4, "b": 4})])
    adaptive = write(tmp_path / "adaptive", [(1, {"a": 4, "b": 4}), (2, {"a": 3, "b": 4})])
    assert not ranks_changed(fixed) and ranks_changed(adaptive)
    assert plot_ranks(fixed, tmp_path / "fixed.png").stat().st_size > 1000  # on request: one readable line


@pytest.mark.parametrize("method", ["fira", "lora"])
def test_hf_model_folder_loads_with_auto_classes(method, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / method
    lr = 3e-3 if method == "lora" else 1e-2
    assert main(tiny_argv(tiny, out, method=method, lr=lr, max_steps=3, eval_every=0)) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf_model")
    assert tokenizer("the cat sees the ball", add_special_tokens=False)["input_ids"][0] > 2  # a known word
    assert tokenizer.eos_token == "</s>"
    state = load_checkpoint(list_checkpoints(out)[-1][1])["model"]
    loaded = model.state_dict()
    assert not any("lora" in k for k in loaded)
    if method == "fira":
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key
    else:  # the adapters are merged: W + B·A·alpha/r
        prefix = "base_model.model."
        q = "model.layers.0.self_attn.q_proj"
        base, a, b = (state[f"{prefix}{q}.{part}.weight"] for part in ("base_layer", "lora_A.default", "lora_B.default"))
        assert not torch.equal(b, torch.zeros_like(b))
        assert torch.allclose(loaded[f"{q}.weight"], base + (b @ a) * (32.0 / 8), atol=1e-6)
        assert torch.equal(loaded["lm_head.weight"], state[f"{prefix}lm_head.weight"])


# --- Ctrl-C, as a user presses it: SIGINT sent to a real `fullrank pretrain` process

RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from fullrank.cli import main
    from fullrank.train import loop

    marker, slow_step = Path(sys.argv[1]), int(sys.argv[2])
    release = marker.with_name("release")
    real = loop.accumulate_gradients
    calls = [0]

    def accumulate(run, ddp, prefetch):
        calls[0] += 1
        if calls[0] == slow_step:  # a long forward/backward, until the test releases it or presses Ctrl-C twice
            marker.write_text("in step")
            while not release.exists():
                time.sleep(0.05)
        return real(run, ddp, prefetch)

    loop.accumulate_gradients = accumulate
    sys.exit(main(sys.argv[3:]))
""")


def _start(tmp_path, argv, slow_step):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    marker = tmp_path / "marker"
    with open(tmp_path / "stderr.txt", "w") as err:  # the child keeps its own copy of the file descriptor
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(marker), str(slow_step), *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, marker, tmp_path / "stderr.txt"


def _wait_for(condition, proc, what):
    deadline = time.monotonic() + 180  # a generous bound against a hung test, not a timing assertion
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after 180 s"
        time.sleep(0.05)


def test_first_ctrl_c_announces_at_once_and_saves_after_the_step(tiny, tmp_path):
    out = tmp_path / "run"
    proc, marker, err = _start(tmp_path, tiny_argv(tiny, out, max_steps=30, eval_every=0), slow_step=3)
    _wait_for(marker.exists, proc, "third step")
    proc.send_signal(signal.SIGINT)  # during step 3
    _wait_for(lambda: "stopping after this step" in err.read_text(), proc, "announcement")  # said before the step ends
    (tmp_path / "release").write_text("")  # the step finishes
    assert proc.wait(timeout=600) == 130
    text = err.read_text()
    assert "checkpoint saved after step 3" in text and f"--resume {out}" in text
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert main(["pretrain", "--resume", str(out), "--max-steps", "4", "--no-progress"]) == 0


def test_second_ctrl_c_stops_at_once_and_the_run_resumes_exactly(tiny, tmp_path):
    # every run in a fresh process, as a user runs them (in-process and subprocess runs may round differently)
    full = tmp_path / "full"
    (tmp_path / "ref").mkdir()
    proc, _, _ = _start(tmp_path / "ref", tiny_argv(tiny, full, max_steps=6, eval_every=0), slow_step=0)
    assert proc.wait(timeout=600) == 0
    out = tmp_path / "cut"
    proc, marker, err = _start(tmp_path, tiny_argv(tiny, out, max_steps=6, eval_every=0), slow_step=4)
    _wait_for(marker.exists, proc, "fourth step")
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: "stopping after this step" in err.read_text(), proc, "announcement")
    proc.send_signal(signal.SIGINT)  # the step is still running: stop now
    assert proc.wait(timeout=600) == 130
    lines = [line for line in err.read_text().splitlines() if line.startswith("fullrank:")]
    assert len(lines) == 1 and "second Ctrl-C during step 4: saved the last completed step 3" in lines[0]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    (tmp_path / "resume").mkdir()
    proc, _, _ = _start(tmp_path / "resume", ["pretrain", "--resume", out, "--no-progress"], slow_step=0)
    assert proc.wait(timeout=600) == 0
    assert [r["loss"] for r in records(out, "train")] == [r["loss"] for r in records(full, "train")]


def test_interrupted_before_the_first_checkpoint_says_how_to_restart(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: llama_tiny\n")  # a run directory stopped before any checkpoint
    assert main(["pretrain", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and "--overwrite" in err
    assert main(tiny_argv(tiny, out, max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" not in err
