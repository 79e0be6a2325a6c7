"""The paper's instruments: scaling-factor probe, similarity analyses, spikes, variance."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fullrank.analysis import similarity as sim
from fullrank.analysis import variance
from fullrank.analysis.harness import make_probes, train_steps
from fullrank.analysis.scaling_probe import (
    PROBE_FILE,
    ScalingProbe,
    projected_weights,
    read_probe,
)
from fullrank.analysis.spikes import (
    SPIKES_FILE,
    SpikeLogger,
    find_spikes,
    read_spikes,
    spike_summary,
)
from fullrank.optim.methods.param_groups import param_groups
from fullrank.optim.methods.presets import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from experiment import run_experiment  # noqa: E402 (bench/experiment.py: a harness, not the package)

torch.set_num_threads(1)
VOCAB, SEQ, BATCH = 64, 16, 4


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_attention_heads=2,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config)


def batches(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)


def run(tmp_path, method="adamw", probe_ranks=(4, 16), steps=7, gap=3, optimizer_cls=None, lr=None):
    model = tiny_model()
    if optimizer_cls is not None:
        optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    else:
        groups = param_groups(model, rank=8, update_proj_gap=gap)
        optimizer = make_optimizer(method, groups, lr=lr or (1e-3 if method == "adamw" else 1e-2))
    probes = None
    if probe_ranks:
        probes = make_probes(model, optimizer, tmp_path, update_proj_gap=gap, scaling_ranks=probe_ranks, flush_every=2)
    losses = train_steps(model, optimizer, batches(), steps, probes=probes)
    return model, losses


def test_probe_records_are_finite_and_shaped(tmp_path):
    model, _ = run(tmp_path)
    probe = read_probe(tmp_path / PROBE_FILE)
    names = [n for n, _ in projected_weights(model)]
    assert probe["meta"]["matrices"] == names and len(names) == 14
    assert probe["meta"]["full_source"] == "optimizer"
    assert [s["step"] for s in probe["steps"]] == list(range(1, 8))
    assert [s["refresh"] for s in probe["steps"]] == [True, False, False, True, False, False, True]
    for s in probe["steps"]:
        assert len(s["phi_G"]) == 14 and all(v is not None and v > 0 for v in s["phi_G"])
        assert set(s["ranks"]) == {"4", "16"}
        for fields in s["ranks"].values():
            for values in fields.values():
                assert len(values) == 14 and all(v is not None and math.isfinite(v) for v in values)
            # ‖R‖ ≤ ‖G‖: P has orthonormal columns
            assert all(r <= g * (1 + 1e-5) for r, g in zip(fields["norm_R"], s["norm_G"]))
    columns = probe["columns"]
    assert columns["steps"] == 7
    # oriented matrices are 32 x 32 (attention) or 32 x 88 (MLP): min(100, long side) columns each
    assert [len(c) for c in columns["phi_G"]] == [32 if 88 not in shape else 88 for shape in probe["meta"]["shapes"]]
    assert all(np.isfinite(np.array(c)).all() for c in columns["ranks"]["4"]["phi_R"])


def test_probe_does_not_change_training(tmp_path):
    for method in ("adamw", "galore"):
        _, with_probe = run(tmp_path / method, method=method)
        _, without = run(tmp_path, method=method, probe_ranks=None)
        assert with_probe == without


def test_phi_G_from_optimizer_state_matches_shadow_adam(tmp_path):
    class OtherAdamW(torch.optim.AdamW):
        """Not recognised as a plain AdamW: the probe falls back to its own shadow Adam."""

    run(tmp_path / "real", optimizer_cls=torch.optim.AdamW)
    run(tmp_path / "shadow", optimizer_cls=OtherAdamW)
    real, shadow = read_probe(tmp_path / "real" / PROBE_FILE), read_probe(tmp_path / "shadow" / PROBE_FILE)
    assert real["meta"]["full_source"] == "optimizer" and shadow["meta"]["full_source"] == "shadow"
    for a, b in zip(real["steps"], shadow["steps"]):
        np.testing.assert_allclose(a["phi_G"], b["phi_G"], rtol=1e-4)
        np.testing.assert_allclose(a["ranks"]["4"]["phi_R"], b["ranks"]["4"]["phi_R"], rtol=1e-4)


def test_step_one_factor_at_full_rank_equals_full_gradient(tmp_path):
    """At step 1 ψ(X) = X/(|X| + ε) ≈ sign(X), so φ(X) ≈ √numel / ‖X‖; with P square ‖R‖ = ‖G‖."""
    run(tmp_path, probe_ranks=(32,), steps=1)
    probe = read_probe(tmp_path / PROBE_FILE)
    first = probe["steps"][0]
    # entries of q/k gradients at init are within a few ε of 0, where sign(X) is only approximate
    np.testing.assert_allclose(first["ranks"]["32"]["phi_R"], first["phi_G"], rtol=2e-2)
    expected = np.array([math.sqrt(a * b) / g for (a, b), g in zip(probe["meta"]["shapes"], first["norm_G"])])
    large = expected < 2e3  # gradients entries far above ε (v, o, MLP)
    assert large.sum() >= 10
    np.testing.assert_allclose(np.array(first["phi_G"])[large], expected[large], rtol=1e-3)
    np.testing.assert_allclose(np.array(first["ranks"]["32"]["phi_R"])[large], expected[large], rtol=5e-3)


def test_probe_rejects_bad_input(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="ranks must be"):
        ScalingProbe(projected_weights(model), opt, tmp_path / "x.jsonl", ranks=[0], update_proj_gap=2)
    with pytest.raises(ValueError, match="update_proj_gap must be"):
        ScalingProbe(projected_weights(model), opt, tmp_path / "x.jsonl", ranks=[2], update_proj_gap=0)
    with pytest.raises(ValueError, match="target_modules"):
        projected_weights(model, ("nothing",))


def test_similarity_against_known_values():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0])
    result = sim.similarity(x, y)
    assert result["spearman"] == pytest.approx(1.0) and result["kendall"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert result["mse"] == pytest.approx(0.25)
    assert result["cosine"] == pytest.approx(34.0 / math.sqrt(30.0 * 39.0))
    reversed_result = sim.similarity(x, -y)
    assert reversed_result["spearman"] == pytest.approx(-1.0)
    assert sim.distance_and_cosine(np.array([3.0, 4.0]), np.array([0.0, 4.0])) == pytest.approx((3.0, 0.8, 0.6))
    assert result["relative_rmse"] == pytest.approx(0.5 / math.sqrt(39.0 / 4.0))


def test_analyses_on_tiny_runs(tmp_path):
    run(tmp_path / "full", method="adamw", probe_ranks=(4, 8))
    run(tmp_path / "low", method="galore", probe_ranks=(8,))
    full, low = read_probe(tmp_path / "full"), read_probe(tmp_path / "low")
    same = sim.same_dynamic(full)
    assert same["skip_steps"] == 3 and set(same["ranks"]) == {"4", "8"}
    row = same["ranks"]["4"]["phi_G~phi_R"]
    assert len(row["cosine"]) == 7 and row["averaged_steps"] == 4
    assert -1 <= row["mean_cosine"] <= 1 and row["mean_distance"] >= 0
    across = sim.across_runs(low, full)
    assert across["rank"] == 8 and across["matrix_level"]["n"] == 14
    assert across["column_level"]["n"] == sum(32 if 88 not in s else 88 for s in full["meta"]["shapes"])
    for level in ("matrix_level", "column_level"):
        assert all(math.isfinite(across[level][k]) for k in ("spearman", "kendall", "pearson", "cosine", "mse"))
    with pytest.raises(ValueError, match="rank must be one of"):
        sim.across_runs(low, full, rank=5)
    bound = sim.bound_check(full)
    assert set(bound) == {"4", "8"} and bound["4"]["pairs"] == 14 * 7
    assert 0 <= bound["4"]["holds_fraction"] <= 1
    real = variance.measured(full, steps=5)
    assert real["steps"] == 5 and all(math.isfinite(v) and v >= 0 for v in real["ranks"].values())


def test_find_spikes_on_a_synthetic_curve():
    losses = [5.0 - 0.01 * i for i in range(40)]
    losses[25] = 6.0  # +25 % over the running median
    losses[30] = losses[29] * 1.05  # +5 %: below the threshold
    assert find_spikes(losses, threshold=0.1, window=10) == [25]
    with pytest.raises(ValueError, match="threshold must be"):
        find_spikes(losses, threshold=0)


class _WithResidualStats(torch.optim.SGD):
    def residual_stats(self):
        return {"residual_norm": torch.tensor(2.0), "limited_norm": torch.tensor(1.5),
                "limited_fraction": torch.tensor(0.25)}


def test_spike_logger_records(tmp_path):
    model = tiny_model()
    for name, cls in (("plain", torch.optim.SGD), ("stats", _WithResidualStats)):
        opt = cls(model.parameters(), lr=1e-3)
        logger = SpikeLogger(opt, model.parameters(), tmp_path / name / SPIKES_FILE, update_proj_gap=2, flush_every=3)
        x = next(batches())
        expected_norms = []
        for step in range(4):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            expected_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item())
            logger.before_step(step)
            opt.step()
            logger.after_step(step, loss.detach())
            opt.zero_grad()
        logger.close()
        meta, steps = read_spikes(tmp_path / name)
        assert meta["has_residual_stats"] is (name == "stats")
        assert [s["refresh"] for s in steps] == [True, False, True, False]
        np.testing.assert_allclose([s["grad_norm"] for s in steps], expected_norms, rtol=1e-5)
        if name == "stats":
            assert steps[0]["limited_fraction"] == 0.25 and steps[0]["residual_norm"] == 2.0
        else:
            assert "residual_norm" not in steps[0]
        summary = spike_summary(steps, 2, window=3)
        assert summary["spikes"] == len(summary["spike_steps"])


def test_variance_falls_with_rank():
    result = variance.simulate(ranks=(1, 4, 16), rows=32, cols=32, steps=4, trials=24, seed=0)
    v = [result["ranks"][r]["variance_across_trials"] for r in ("1", "4", "16")]
    assert v[0] > v[1] > v[2] > 0
    c = [result["ranks"][r]["column_variance"] for r in ("1", "4", "16")]
    assert c[0] > c[2]
    with pytest.raises(ValueError, match="ranks must lie"):
        variance.simulate(ranks=(64,), rows=32)


def test_run_experiment_end_to_end(tmp_path):
    from train_fixtures import setup_tiny

    paths = setup_tiny(tmp_path)
    summary = run_experiment(tmp_path / "run", method="adamw", model=str(paths["model"]), rank=8, steps=6,
                             update_proj_gap=3, batch_size=2, seq_len=16, scaling_ranks=(4,),
                             data=str(paths["data"]), val_data=str(paths["val"]), tokenizer=str(paths["tokenizer"]),
                             eval_blocks=2)
    assert math.isfinite(summary["final_val_loss"]) and summary["spikes"]["threshold"] == 0.1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["steps"] == 6
    assert len(read_probe(tmp_path / "run")["steps"]) == 6


def test_analysis_command_line(tmp_path, capsys):
    from fullrank.analysis.__main__ import main

    run(tmp_path / "full", method="adamw", probe_ranks=(4,))
    run(tmp_path / "low", method="galore", probe_ranks=(4,))
    assert main(["scaling", str(tmp_path / "full"), "--plot", str(tmp_path / "same.png"), "--json", str(tmp_path / "s.json")]) == 0
    assert "| 4 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "low"), str(tmp_path / "full"), "--plot", str(tmp_path / "fig3.png")]) == 0
    assert "| matrix | 14 |" in capsys.readouterr().out
    assert main(["variance", "--probe", str(tmp_path / "full"), "--ranks", "1,4", "--rows", "16", "--cols", "16",
                 "--steps", "4", "--trials", "4", "--plot", str(tmp_path / "var.png")]) == 0
    assert main(["spikes", str(tmp_path / "full"), str(tmp_path / "low"), "--window", "3",
                 "--plot", str(tmp_path / "spikes.png")]) == 0
    for name in ("same.png", "fig3.png", "var.png", "spikes.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert json.loads((tmp_path / "s.json").read_text())["same_dynamic"]["skip_steps"] == 3
    assert main(["compare", str(tmp_path / "low"), str(tmp_path / "nothing")]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_spike_logger_reads_the_engine_residual_stats(tmp_path):
    """With Fira's engine the records carry ‖S‖ before/after the limiter; the run is unchanged."""
    losses = {}
    for logged in (True, False):
        model = tiny_model()
        opt = make_optimizer("fira", param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
        probes = make_probes(model, opt, tmp_path, update_proj_gap=3, spikes=logged) if logged else None
        losses[logged] = train_steps(model, opt, batches(), 6, probes=probes)
    assert losses[True] == losses[False]
    meta, steps = read_spikes(tmp_path)
    assert meta["has_residual_stats"]  # Fira reports its residual statistics: the records below hold them
    for s in steps:
        assert s["residual_norm"] > 0 and 0 <= s["limited_norm"] <= s["residual_norm"] * (1 + 1e-6)
        assert 0 <= s["limited_fraction"] <= 1


def test_loop_probes_from_a_config(tmp_path):
    from fullrank.train.config import TrainConfig

    from fullrank.train.probes import default_probe_ranks, loop_probes, parse_probe_names, probe_summary

    model = tiny_model()
    assert default_probe_ranks(model) == [2, 16]
    assert parse_probe_names("scaling, spikes") == ("scaling", "spikes") and parse_probe_names("") == ()
    with pytest.raises(ValueError, match="probe must be"):
        parse_probe_names("scaling,loss")
    cfg = TrainConfig.build(dict(probe="scaling,spikes", probe_ranks=[], target_modules=["self_attn", "mlp"],
                                 update_proj_gap=2, beta1=0.9, beta2=0.999, eps=1e-8, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probes = loop_probes(cfg, model, opt, tmp_path)
    train_steps(model, opt, batches(), 4, probes=probes)
    assert read_probe(tmp_path)["meta"]["ranks"] == [2, 16]
    assert probe_summary(tmp_path)["spikes"]["window"] == 20
    assert loop_probes(cfg.replace(probe=""), model, opt, tmp_path) is None
    with pytest.raises(ValueError, match="--probe-ranks: give integers >= 1"):
        loop_probes(cfg.replace(probe_ranks=["x"]), model, opt, tmp_path)
    with pytest.raises(ValueError, match="--probe: not available with --layerwise"):
        loop_probes(cfg.replace(layerwise=True), model, opt, tmp_path)
    with pytest.raises(ValueError, match="--probe: probe must be"):
        loop_probes(cfg.replace(probe="loss"), model, opt, tmp_path)


def test_pretrain_carries_the_probes(tmp_path):
    """``fullrank pretrain --probe scaling,spikes``: records, spike metric, same losses as without."""
    from train_fixtures import setup_tiny, tiny_argv

    from fullrank.cli import main

    paths = setup_tiny(tmp_path)
    runs = {}
    for name, flags in (("probed", {"probe": "scaling,spikes", "probe_ranks": "2,4"}), ("plain", {})):
        out = tmp_path / name
        assert main(tiny_argv(paths, out, method="fira", max_steps=6, update_proj_gap=3, eval_every=0,
                              threads=1, **flags)) == 0
        runs[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line).get("type") == "train"]
    out = tmp_path / "probed"
    assert runs["probed"] == runs["plain"] and len(runs["plain"]) == 6
    probe = read_probe(out)
    assert probe["meta"]["ranks"] == [2, 4] and len(probe["steps"]) == 6
    meta, steps = read_spikes(out)
    assert meta["has_residual_stats"] and all(s["residual_norm"] > 0 for s in steps)
    assert json.loads((out / "summary.json").read_text())["spikes"]["window"] == 20
    assert not (tmp_path / "plain" / "spikes.jsonl").exists()
    assert main(["plot", "--spikes", str(out)]) == 0 and (out / "spikes.png").stat().st_size > 10_000
    assert main(["plot", "--spikes", str(tmp_path / "plain")]) == 2
