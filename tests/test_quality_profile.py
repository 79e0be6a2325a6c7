"""The gpu60m study of ``bench/quality.py``: its plan, and its CPU dry run (``--quick``) end to end."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from fullrank.train.models import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "quality.py"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "enwiki-2015-train.jsonl.gz").is_file()
                                or not (SHARED_DATA / "t5-base").is_dir(), reason=f"the corpus is missing: {SHARED_DATA}")


def load_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quality(monkeypatch, capsys):
    """``bench/quality.py ARGS`` in this process (its runs are subprocesses of this checkout's ``src``):
    returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OUT", raising=False)
    module = load_quality()

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = module.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    run.module = module
    return run


def test_gpu60m_plan_fits_one_call_and_one_pass_over_the_corpus():
    q = load_quality()
    profile = q.gpu60m_profile()
    assert (profile["model"], profile["seq_len"]) == ("llama_60m", 256) and profile["batch_size"] >= 32
    tokens_per_step = profile["batch_size"] * profile["grad_accum"] * profile["seq_len"]
    assert profile["max_steps"] * tokens_per_step <= q.TRAIN_CORPUS_TOKENS  # no repeated data
    assert profile["max_steps"] == profile["eval_every"] * q.EVALS_PER_RUN
    every_row = [q.estimate_row_s(profile, q.run_options(profile, row, 0)) for _, _, row in q.STUDY_ROWS]
    assert q.estimate_call_s(every_row, q.STUDY_JOBS) <= q.STUDY_BUDGET_S
    # 100 more steps would not fit, unless the corpus is the limit
    longer = dict(profile, max_steps=profile["max_steps"] + 100, eval_every=(profile["max_steps"] + 100) // 4)
    more = [q.estimate_row_s(longer, q.run_options(longer, row, 0)) for _, _, row in q.STUDY_ROWS]
    assert (q.estimate_call_s(more, q.STUDY_JOBS) > q.STUDY_BUDGET_S
            or longer["max_steps"] * tokens_per_step > q.TRAIN_CORPUS_TOKENS)


def test_flop_model_counts_the_parameters_of_llama_60m():
    q = load_quality()
    flops = q.flops_per_token("llama_60m", 256)
    assert flops["parameters"] == sum(p.numel() for p in build_model(model_config("llama_60m"), 0).parameters())
    assert flops["train"] == 3 * flops["forward"]


def test_rows_name_the_issue_conventions_and_bad_rows_are_refused():
    q = load_quality()
    rows = {row_id: row for row_id, _, row in q.STUDY_ROWS}
    assert rows["fira_official_residual"]["optim_args"] == {"residual_convention": "official"}
    assert rows["fira_transformers_adam"]["optim_args"] == {"adam_convention": "transformers"}
    assert rows["fira_eps1e-6"]["eps"] == 1e-6
    assert q.unavailable_reason(dict(method="fira", optim_args={"residual_convention": "official"})) is None
    assert "not in this build" in q.unavailable_reason(dict(method="no_such_method"))
    assert "no_such_option" in q.unavailable_reason(dict(method="fira", optim_args={"no_such_option": 1}))
    with pytest.raises(ValueError, match="allowed: fira, galore, adamw_lr1e-3, .*fira_8bit"):
        q.parse_rows("fira,firaa")


@needs_data
def test_quick_dry_run_trains_caches_and_defers(tmp_path, quality):
    rows = "adamw_lr1e-3,fira_8bit"
    code, out, err = quality("--quick", "--rows", rows, "--threads", "1", "--out", str(tmp_path))
    assert code == 0, err[-2000:]
    assert "plan (gpu60m-quick)" in out and "est. GPU s (H200)" in out
    results_path = tmp_path / "quality_gpu60m-quick.json"
    results = json.loads(results_path.read_text())
    assert (tmp_path / "quality_gpu60m-quick.png").stat().st_size > 0
    trained = {r["row"]: r for r in results["runs"].values()}
    assert set(trained) == {"adamw_lr1e-3", "fira_8bit"}  # (states="8bit" is in this build)
    assert all(math.isfinite(r["final_val_ppl"]) and r["final_val_ppl"] > 1 and r["seed"] == 0 for r in trained.values())
    assert results["unavailable"] == {}
    summaries = {key: (tmp_path / "runs" / key / "summary.json").stat().st_mtime_ns for key in results["runs"]}

    code, out, err = quality("--quick", "--rows", rows, "--threads", "1", "--out", str(tmp_path))
    assert code == 0, err[-2000:]
    call = json.loads(results_path.read_text())["calls"][-1]
    assert call["trained"] == [] and set(call["cached"]) == set(trained)
    assert {key: (tmp_path / "runs" / key / "summary.json").stat().st_mtime_ns for key in summaries} == summaries

    # a budget too small for one more run: the next seed's row waits for the next call, nothing is lost
    code, out, err = quality("--quick", "--rows", "fira", "--seed", "1", "--budget-s", "1", "--out", str(tmp_path))
    assert code == 0, err[-2000:]
    results = json.loads(results_path.read_text())
    assert results["calls"][-1]["deferred"] == ["fira"] and len(results["runs"]) == len(trained)


@needs_data
def test_bad_rows_and_flags_give_clear_errors(tmp_path, quality):
    code, _, err = quality("--quick", "--rows", "fira,galor", "--out", str(tmp_path))
    assert code == 2 and "--rows: unknown row 'galor'; allowed: fira, galore, adamw_lr1e-3, adamw_lr3e-3" in err
    code, _, err = quality("--profile", "gpu60m", "--seeds", "2")
    assert code == 2 and "--seeds does not apply to --profile gpu60m" in err
    code, _, err = quality("--profile", "cpu", "--rows", "fira")
    assert code == 2 and "--rows applies to --profile gpu60m only" in err


@needs_data
def test_a_run_past_the_deadline_is_stopped_and_reported(tmp_path, quality, monkeypatch):
    monkeypatch.setattr(quality.module, "DEADLINE_GRACE_S", -29.0)  # budget 30 s: started, then killed after 1 s
    code, _, err = quality("--quick", "--rows", "galore", "--budget-s", "30", "--threads", "1", "--out", str(tmp_path))
    assert code == 1, err[-2000:]
    call = json.loads((tmp_path / "quality_gpu60m-quick.json").read_text())["calls"][-1]
    assert "stopped at the call's deadline" in call["failed"]["galore"] and call["trained"] == []


def test_only_runs_of_the_current_configuration_are_tabulated():
    q = load_quality()
    profile = dict(q.QUICK_PROFILE)
    fira = next(row for row_id, _, row in q.STUDY_ROWS if row_id == "fira")
    record = dict(row="fira", seed=0, final_val_ppl=100.0, optimizer_state_bytes=1, tokens_per_s=1.0, curve=[])
    current = q.run_key(q.run_options(profile, fira, 0))
    older = q.run_key(q.run_options(dict(profile, max_steps=profile["max_steps"] + 1), fira, 0))
    results = dict(profile=profile, unavailable={}, runs={current: record, older: dict(record, final_val_ppl=900.0)})
    (entry,) = q.study_rows_table(results, ["fira"])
    assert entry["ppl"] == [100.0] and entry["seeds"] == [0]
