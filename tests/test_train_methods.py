"""Every method of ``fullrank pretrain`` really trains a micro LLaMA on a tiny repeated corpus."""
from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import setup_tiny, single_thread, tiny_argv  # noqa: F401 (autouse fixture)

from fullrank.cli import main
from fullrank.train.config import all_methods


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return setup_tiny(tmp_path_factory.mktemp("tiny"))


def train_losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


@pytest.mark.parametrize("method", all_methods())
def test_method_trains(method, tiny, tmp_path):
    out = tmp_path / method
    lr = 3e-3 if method in ("adamw", "lora", "relora") else 1e-2
    extra = {"relora_every": 10, "relora_warmup": 3} if method == "relora" else {}
    rc = main(tiny_argv(tiny, out, method=method, lr=lr, max_steps=24, allow_repeat=True, eval_every=0, **extra))
    assert rc == 0
    losses = train_losses(out)
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{method}: loss {first:.3f} -> {last:.3f}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["optimizer_state_bytes"] > 0
    assert summary["final_val_ppl"] < torch.tensor(summary["final_val_loss"]).exp().item() * 1.0001
    assert (out / "loss.png").stat().st_size > 1000


def test_projected_methods_hold_less_state_than_adamw(tiny, tmp_path):
    """The projected moments of Fira/GaLore are smaller than AdamW's full ones (rank 4 of 32)."""
    sizes = {}
    for method in ("adamw", "galore", "fira"):
        main(tiny_argv(tiny, tmp_path / method, method=method, rank=4, max_steps=2, eval_every=0))
        sizes[method] = json.loads((tmp_path / method / "summary.json").read_text())["optimizer_state_bytes"]
    assert sizes["galore"] < sizes["adamw"] and sizes["fira"] < sizes["adamw"]


def test_lora_trains_only_adapters_and_unprojected_weights(tiny, tmp_path):
    from fullrank.train.lora import apply_lora
    from fullrank.train.models import build_model, model_config, projected_linears

    model = build_model(model_config(str(tiny["model"])), 0)
    names = [n for n, _ in projected_linears(model, ("self_attn", "mlp"))]
    model = apply_lora(model, names, rank=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert any("lm_head" in n for n in trainable) and any("norm" in n for n in trainable)
    assert not any(".base_layer." in n for n in trainable)


def test_relora_restart_merges_without_changing_the_function(tiny):
    from fullrank.train.lora import apply_lora, lora_parameters, relora_restart
    from fullrank.train.models import build_model, model_config, projected_linears

    model = build_model(model_config(str(tiny["model"])), 0)
    names = [n for n, _ in projected_linears(model, ("self_attn", "mlp"))]
    model = apply_lora(model, names, rank=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (2, 16))
    for _ in range(3):  # make the adapters non-zero
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        before = model(input_ids=x).logits
    assert relora_restart(model, opt, prune=1.0) == len(names)
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for p in lora_parameters(model):
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0
    assert all(torch.count_nonzero(m.weight) == 0 for n, m in model.named_modules() if n.endswith("lora_B.default"))


def test_moment_pruning_keeps_the_largest_first_moments_in_both():
    from fullrank.train.lora import prune_moments_

    m = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, -0.3, 0.4, 2.0])
    v = torch.full_like(m, 7.0)
    prune_moments_(m, v, 0.7)
    kept = torch.tensor([False, True, False, True, False, False, False, False, False, True])
    assert torch.equal(m != 0, kept) and torch.equal(v != 0, kept)


def test_adaptive_ranks_are_logged_and_plotted(tiny, tmp_path, capsys):
    """AdaRankGrad's per-matrix ranks reach metrics.jsonl (when they change), the summary and rank.png."""
    from fullrank.train.plot import rank_history

    out = tmp_path / "ada"
    assert main(tiny_argv(tiny, out, method="adarankgrad", rank=8, max_steps=12, update_proj_gap=3,
                          allow_repeat=True, eval_every=0, optim_arg="rank_energy=0.9")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert all(1 <= r["rank_min"] <= r["rank_median"] <= r["rank_max"] <= 8 for r in train)
    changes = [r for r in train if "ranks" in r]
    assert changes[0]["step"] == 1 and len(changes[0]["ranks"]) == 2 * 7  # 2 layers × q,k,v,o,gate,up,down
    assert all(name.endswith("_proj.weight") for name in changes[0]["ranks"])
    assert len(changes) >= 3  # refreshes every 3 steps re-choose the ranks (η = 0.9)
    for before, after in zip(changes, changes[1:]):
        assert before["ranks"] != after["ranks"]  # logged only when a rank changed
        if sum(before["ranks"].values()) != sum(after["ranks"].values()):
            assert before["optimizer_state_bytes"] != after["optimizer_state_bytes"]
            assert (before["optimizer_state_bytes"] - before["projected_state_bytes"]
                    == after["optimizer_state_bytes"] - after["projected_state_bytes"])  # the plain group's
    # the state is allocated at the current ranks: bytes logged at the last change = the final bytes
    summary = json.loads((out / "summary.json").read_text())
    assert changes[-1]["optimizer_state_bytes"] == summary["optimizer_state_bytes"]
    assert changes[-1]["projected_state_bytes"] == summary["projected_state_bytes"] < summary["optimizer_state_bytes"]
    last = changes[-1]["ranks"]
    assert summary["final_ranks"]["max"] == max(last.values()) and summary["final_ranks"]["min"] == min(last.values())
    history = rank_history(out)
    assert set(history) == set(last) and all(points[-1] == (12, last[name]) for name, points in history.items())
    assert (out / "rank.png").stat().st_size > 1000

    plot = tmp_path / "ranks.png"
    assert main(["plot", "--ranks", str(out), "-o", str(plot)]) == 0 and plot.stat().st_size > 1000
    plain = tmp_path / "adamw"
    assert main(tiny_argv(tiny, plain, method="adamw", lr=3e-3, max_steps=2, eval_every=0)) == 0
    assert not any("rank_min" in json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines())
    assert json.loads((plain / "summary.json").read_text())["final_ranks"] is None
    capsys.readouterr()
    assert main(["plot", "--ranks", str(plain)]) == 2
    assert "no rank records" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fira", "adamw"])
def test_layerwise_pretrain_has_the_ordinary_losses(method, tiny, tmp_path):
    """``--layerwise`` (weights stepped during backward, gradient accumulation over 2 micro-batches,
    a refresh at step 5) trains to the same losses as the ordinary loop, and resumes exactly."""
    common = dict(method=method, max_steps=8, update_proj_gap=5, grad_accum=2, eval_every=0, save_every=4)
    assert main(tiny_argv(tiny, tmp_path / "ordinary", **common)) == 0
    assert main(tiny_argv(tiny, tmp_path / "layerwise", layerwise=True, **common)) == 0
    ordinary, layerwise = train_losses(tmp_path / "ordinary"), train_losses(tmp_path / "layerwise")
    assert len(ordinary) == 8 and layerwise == pytest.approx(ordinary, rel=1e-5, abs=1e-6)
    # resume the layer-wise run from its step-4 checkpoint: the same last four losses
    assert main(tiny_argv(tiny, tmp_path / "layerwise", layerwise=True, **dict(common, max_steps=4), schedule_steps=8,
                          overwrite=True)) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "layerwise"), "--max-steps", "8", "--no-progress"]) == 0
    assert train_losses(tmp_path / "layerwise")[4:] == pytest.approx(layerwise[4:], rel=1e-6, abs=1e-7)


def test_layerwise_refuses_gradient_clipping(tiny, tmp_path, capsys):
    assert main(tiny_argv(tiny, tmp_path / "clip", layerwise=True, grad_clip=1.0)) == 2
    assert "--grad-clip must be 0 with --layerwise" in capsys.readouterr().err
