"""bench/sweep.py: the sweep's chosen runs share quality.py's cache keys; the table reads every cached
seed and states a mean ± half-range only where two seeds exist."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import quality  # noqa: E402
import sweep  # noqa: E402


@pytest.mark.parametrize("spec, message", [
    ("cpu:fira:3e-3", "expected PROFILE:METHOD:LR:SEED"),
    ("gpu:fira:3e-3:0", "profile must be one of cpu, cpu_long"),
    ("cpu:firaa:3e-3:0", "method must be one of fira, galore"),
    ("cpu:fira:fast:0", "LR must be a number"),
    ("cpu:fira:0:0", "LR must be in (0, 1]"),
    ("cpu:fira:3e-3:-1", "SEED at least 0"),
])
def test_bad_runs_are_refused_naming_the_part(spec, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["run", spec])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _cache(root: Path, profile: str, method: str, lr: float, seed: int, ppl: float) -> str:
    options = quality.run_options(quality.PROFILES[profile], dict(method=method, lr=lr), seed)
    folder = root / profile / quality.run_key(options)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"final_val_ppl": ppl, "optimizer_state_bytes": 10}))
    return folder.name


def test_table_collects_the_seeds_of_each_horizon_under_quality_s_keys(tmp_path, capsys):
    _cache(tmp_path, "cpu", "fira", 3e-3, 0, 740.0)
    _cache(tmp_path, "cpu", "fira", 3e-3, 1, 730.0)
    key = _cache(tmp_path, "cpu_long", "ldadam", 1e-2, 0, 594.2)
    _cache(tmp_path, "cpu", "scale", 1e-3, 1, 710.0)  # a second seed without the first
    out = tmp_path / "sweep.json"
    assert sweep.main(["--runs", str(tmp_path), "table", "--output", str(out)]) == 0
    data = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in data["cpu"]] == ["Fira lr=0.003", "SCALE lr=0.001"]
    assert data["cpu_long"] == [{"label": "LDAdam lr=0.01", "options": {"method": "ldadam", "lr": 0.01},
                                 "runs": [{"seed": 0, "val_ppl": 594.2, "state_bytes": 10, "key": key}]}]
    printed = capsys.readouterr().out
    assert "| Fira | 0.003 | 740.0 | 730.0 | 735.0 ± 5.0 |" in printed
    assert "| SCALE | 0.001 | — | 710.0 | — |" in printed and "| LDAdam | 0.01 | 594.2 | — | — |" in printed


def test_run_reuses_a_cached_run_without_training(tmp_path, capsys):
    _cache(tmp_path, "cpu_long", "fira", 3e-3, 1, 588.0)
    assert sweep.main(["--runs", str(tmp_path), "run", "cpu_long:fira:3e-3:1", "--jobs", "1"]) == 0
    assert "cpu_long:fira:3e-3:1: val ppl 588.00" in capsys.readouterr().out
