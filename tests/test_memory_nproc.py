"""``fullrank memory --fsdp --nproc N``: the per-rank peak of an FSDP2 step traced on a fake process
group, checked against the shard arithmetic of FSDP2 and against two real gloo processes measured
by torch.profiler (bench/memory_check.py --nproc 2)."""
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from fullrank.cli import main
from fullrank.memory import CATEGORIES, COMMUNICATION_CATEGORIES, fewest_ranks, trace
from fullrank.train.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_check  # noqa: E402
from processes import spawn as spawn_processes  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")


def config_file(folder: Path, **fields) -> str:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False)
    path = folder / "config.json"
    LlamaConfig(**{**base, **fields}).to_json_file(str(path))
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return config_file(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """Vocabulary 510: over 4 ranks the embedding and lm_head split 128, 128, 128, 126 rows."""
    return config_file(tmp_path_factory.mktemp("uneven"), vocab_size=510)


def meta_parameters(path: str) -> list[torch.Tensor]:
    from fullrank.train.models import model_config

    with torch.device("meta"):
        return list(LlamaForCausalLM(model_config(path)).parameters())


def test_weights_are_the_padded_row_shards_and_adamw_state_the_rank_s_rows(uneven):
    """FSDP2 keeps ceil(m/N) rows of storage for every m-row parameter on every rank (the last ranks'
    rows padded); AdamW's moments cover the rank's own rows only, so the last rank holds less."""
    params = meta_parameters(uneven)
    buffers = 64  # the rotary inv_freq, fp32 (head_dim 16 / 2 values)
    for nproc in (1, 2, 4):
        chunk = [math.ceil(p.shape[0] / nproc) for p in params]
        expected_weights = sum(c * math.prod(p.shape[1:]) * 2 for c, p in zip(chunk, params)) + buffers
        for rank in sorted({0, nproc - 1}):
            rows = [max(0, min(c, p.shape[0] - rank * c)) for c, p in zip(chunk, params)]
            moments = sum(2 * r * math.prod(p.shape[1:]) * 2 for r, p in zip(rows, params))
            result = trace(uneven, "adamw", weights="bf16", seq_len=16, nproc=nproc, fsdp=True, traced_rank=rank)
            assert result.resident_bytes["weights"] == expected_weights, (nproc, rank)
            steps = result.resident_bytes["optimizer_state"] - moments  # torch AdamW: a 0-d fp32 step per parameter
            assert steps == 4 * len(params), (nproc, rank, steps)
    last = trace(uneven, "adamw", weights="bf16", seq_len=16, nproc=4, fsdp=True, traced_rank=3)
    first = trace(uneven, "adamw", weights="bf16", seq_len=16, nproc=4, fsdp=True)
    # embedding and lm_head: 2 rows fewer, 64 columns, 2 moments, 2 bytes
    assert first.resident_bytes["optimizer_state"] - last.resident_bytes["optimizer_state"] == 2 * 2 * 64 * 2 * 2


def test_sharded_trace_has_the_communication_buffers_and_falls_with_the_ranks(small):
    peaks = []
    for nproc in (1, 2, 4):
        result = trace(small, "fira", rank=8, weights="bf16", batch_size=2, seq_len=32, nproc=nproc, fsdp=True)
        assert set(result.by_category) == set(CATEGORIES + COMMUNICATION_CATEGORIES)
        assert result.peak_bytes == sum(result.by_category.values())
        assert result.settings["nproc"] == nproc and result.settings["traced_rank"] == 0
        peaks.append(result.peak_bytes)
    assert peaks[0] > peaks[1] > peaks[2]
    one = trace(small, "fira", rank=8, weights="bf16", batch_size=2, seq_len=32)
    assert set(one.by_category) == set(CATEGORIES) and "nproc" not in one.settings


def test_the_layers_being_computed_are_whole_in_bf16(small):
    """At a forward or backward peak the all-gathered layers are whole in the compute dtype, bf16:
    the output unit (final norm and lm_head: gathered from its forward to its backward, which comes
    right after) and at most two decoder layers (the current one and the prefetched one), never the
    embedding beside them (its own unit, gathered only while it computes)."""
    params = dict(zip([n for n, _ in LlamaForCausalLM(LlamaConfig.from_json_file(small)).named_parameters()],
                      meta_parameters(small)))
    output = sum(p.numel() for n, p in params.items() if n.startswith(("lm_head", "model.norm"))) * 2
    embedding = sum(p.numel() for n, p in params.items() if "embed_tokens" in n) * 2
    layer = sum(p.numel() for n, p in params.items() if ".layers.0." in n) * 2
    result = trace(small, "adamw", weights="fp32", batch_size=8, seq_len=128, nproc=4, fsdp=True)
    assert result.peak_phase.startswith(("forward", "backward"))
    gathered = result.by_category["all_gathered_layers"]
    assert output <= gathered <= output + 2 * layer + 4096, (gathered, output, layer)
    assert gathered < output + embedding, (gathered, output, embedding)


def test_an_owner_gathers_one_whole_gradient_at_a_time(tmp_path):
    """Only the three down projections are projected and all refresh in the traced step: rank 0 owns
    two of the refreshes, rank 1 one. The refresh runs in rounds of one matrix per owner, so rank 0
    never holds its two whole gradients at once and both ranks peak alike (in backward, not in the
    refresh)."""
    path = memory_check.refresh_model(tmp_path)
    settings = dict(memory_check.REFRESH_SETTINGS, batch_size=1, seq_len=8, nproc=2, fsdp=True)
    owner = trace(path, **settings)
    other = trace(path, **settings, traced_rank=1)
    assert owner.peak_bytes == other.peak_bytes
    assert owner.peak_phase.startswith("backward")


def test_trace_is_within_1_percent_of_two_real_gloo_processes(tmp_path):
    """Each rank's trace against the profiler's peak of its own real process (bench/memory_check.py):
    the refresh-owner step, and llama_tiny with the goal's settings (bf16 weights written by
    stochastic rounding, 8-bit states, layer-wise updates) and activation checkpointing."""
    jobs = [(memory_check.refresh_model(tmp_path), memory_check.REFRESH_CASE, 1, 8),
            ("llama_tiny", "fira_bf16sr_8bit_layerwise_checkpointing", 2, 32)]
    rows = memory_check.compare_sharded(jobs, nproc=2, spawn=spawn_processes)
    assert len(rows) == 4
    for row in rows:
        assert abs(row["relative_error"]) <= 0.01, row
    # the CPU collectives' scratch (gloo's copy of a whole reduce-scatter input, the CPU copy-in's
    # staging) is real on the CPU, not on a GPU, and left out; it raises a peak only where it coincides
    # with it (not in the layer-wise step, whose peak is in backward)
    assert all(row["measured_bytes_with_cpu_scratch"] >= row["measured_bytes"] for row in rows)
    assert any(row["measured_bytes_with_cpu_scratch"] > row["measured_bytes"] for row in rows)


def test_fewest_ranks_stops_at_the_first_count_that_fits(small):
    settings = dict(model=small, method="fira", rank=8, weights="bf16", batch_size=2, seq_len=32)
    two = trace(**settings, nproc=2, fsdp=True)
    four = trace(**settings, nproc=4, fsdp=True)
    budget = (two.peak_bytes + four.peak_bytes) / 2
    seen = []
    search, result = fewest_ranks(budget, 8, on_trace=seen.append, **settings)
    assert search["fewest_nproc"] == 4 and [t["nproc"] for t in search["tried"]] == [1, 2, 4]
    assert result.peak_bytes == four.peak_bytes and [t.settings["nproc"] for t in seen] == [1, 2, 4]
    none, _ = fewest_ranks(four.peak_bytes / 100, 3, **settings)
    assert none["fewest_nproc"] == 0 and [t["nproc"] for t in none["tried"]] == [1, 2, 3]


def test_cli_prints_rank_0_and_the_communication_rows_and_reports_each_trace(small, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["memory", "--model", small, "--method", "fira", "--rank", "8", "--weights", "bf16", "--seq-len", "16",
            "--fsdp", "--nproc", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "rank 0 of 2" in captured.out and "all gathered layers" in captured.out
    assert "reduce scatter inputs" in captured.out and "2 ranks (FSDP2, rank 0 traced)" in captured.out
    progress = captured.err.strip().splitlines()
    assert progress[0].startswith("fullrank memory: tracing") and "rank 0 traced" in progress[0]
    assert len(progress) == 3 and "traced fira rank 8, batch 1, 2 ranks" in progress[1] and "traced adamw" in progress[2]
    data = json.loads(out.read_text())
    assert data["trace"]["settings"]["nproc"] == 2 and data["adamw"]["settings"]["fsdp"] is True
    assert set(COMMUNICATION_CATEGORIES) <= set(data["adamw_by_category"])
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_budget_with_max_nproc_reports_the_rank_search(small, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["memory", "--model", small, "--method", "fira", "--rank", "8", "--weights", "bf16", "--seq-len", "16",
                 "--fsdp", "--budget", "1", "--max-nproc", "4", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "fewest ranks that fit: 1" in captured.out and "searching the fewest FSDP2 ranks among 1, 2, 4" in captured.err
    search = json.loads(out.read_text())["budget"]["nproc_search"]
    assert search["fewest_nproc"] == 1 and search["max_nproc"] == 4


@pytest.mark.parametrize("argv,words", [
    (["--nproc", "4"], ["--nproc 4", "--fsdp", "DDP"]),
    (["--max-nproc", "4"], ["--max-nproc", "--budget"]),
    (["--fsdp", "--budget", "1", "--max-nproc", "4", "--nproc", "2"], ["--max-nproc", "--nproc 2", "not both"]),
    (["--budget", "1", "--max-nproc", "4"], ["--max-nproc", "--fsdp"]),
    (["--max-nproc", "0"], ["--max-nproc", "'0'"]),
    (["--nproc", "-2", "--fsdp"], ["--nproc", "'-2'"]),
])
def test_bad_rank_flags_are_one_line_naming_the_flag(small, argv, words, capsys):
    assert main(["memory", "--model", small, "--seq-len", "8", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_traced_rank_outside_the_ranks_is_refused(small):
    with pytest.raises(ConfigError, match=r"traced_rank must be in \[0, 1\]"):
        trace(small, "adamw", seq_len=8, nproc=2, fsdp=True, traced_rank=2)


def test_no_third_party_warning_reaches_the_console(small, capsys):
    """The module tracker's "hierarchy tracking maybe be messed up" (transformers' kernel-hub
    ``Func`` modules) and the layer-wise optimizer's warning about the FSDP tracker's step pre-hook
    are dropped, and the tracker's global warning format restored."""
    formatwarning = warnings.formatwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace(small, "fira", rank=8, weights="bf16", seq_len=16, activation_checkpointing=True)
        trace(small, "fira", rank=8, weights="bf16", seq_len=16, nproc=2, fsdp=True, activation_checkpointing=True)
        trace(small, "fira", rank=8, weights="bf16", seq_len=16, nproc=2, fsdp=True, layerwise=True)
    assert [str(w.message) for w in caught] == []
    assert warnings.formatwarning is formatwarning
    assert main(["memory", "--model", small, "--rank", "8", "--seq-len", "8", "--no-progress"]) == 0
    assert "Warning" not in capsys.readouterr().err


def test_llama_13b_and_70b_are_llama_2_with_grouped_query_attention():
    from fullrank.train.models import DEFAULT_RANKS, model_config

    counts = {}
    for name in ("llama_13b", "llama_70b"):
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config(name))
        counts[name] = sum(p.numel() for p in model.parameters())
        attention = model.model.layers[0].self_attn
        if name == "llama_70b":
            assert model.config.num_key_value_heads == 8
            assert tuple(attention.k_proj.weight.shape) == tuple(attention.v_proj.weight.shape) == (1024, 8192)
            assert DEFAULT_RANKS[name] <= min(attention.k_proj.weight.shape)
    assert counts == {"llama_13b": 13_015_864_320, "llama_70b": 68_976_648_192}  # LLaMA-2's published sizes


def test_layerwise_on_fsdp_frees_each_gradient_shard_after_its_step(tmp_path):
    """``--layerwise --fsdp`` goes through ``fullrank pretrain``'s layer-wise optimizer on the sharded
    model: each shard steps once reduce-scattered and its gradient goes. The step whose peak holds
    almost every gradient shard without it peaks lower and with almost none of them."""
    path = memory_check.refresh_model(tmp_path)
    settings = dict(memory_check.REFRESH_SETTINGS, batch_size=1, seq_len=8, nproc=2, fsdp=True)
    plain = trace(path, **settings)
    layerwise = trace(path, **settings, layerwise=True)
    assert layerwise.settings["layerwise"] and layerwise.settings["fsdp"]
    assert plain.by_category["gradients"] > 0
    assert layerwise.by_category["gradients"] < plain.by_category["gradients"] / 4
    assert layerwise.peak_bytes < plain.peak_bytes


def test_8bit_states_and_stochastic_rounding_on_fsdp_shards(small):
    common = dict(rank=8, seq_len=16, nproc=2, fsdp=True)
    plain = trace(small, "fira", weights="bf16", **common)
    eight = trace(small, "fira", weights="bf16", states="8bit", **common)
    rounded = trace(small, "fira", weights="bf16-sr", **common)
    # bf16 moments (2 bytes) become 1-byte codes and a max per 256-value block; P stays bf16
    assert eight.resident_bytes["optimizer_state"] < 0.7 * plain.resident_bytes["optimizer_state"]
    assert rounded.resident_bytes == plain.resident_bytes  # stochastic rounding keeps no state
