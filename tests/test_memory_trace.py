"""``fullrank memory`` / ``fullrank.memory.trace``: the traced peak of two training iterations on fake
tensors, checked against a real CPU run measured by torch.profiler (bench/memory_check.py)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from fullrank.cli import main
from fullrank.memory import CATEGORIES, largest_batch, trace
from fullrank.train.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_check  # noqa: E402


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> str:
    """A LLaMA config.json whose activations outweigh its weights (vocabulary 512)."""
    path = tmp_path_factory.mktemp("model") / "config.json"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False).to_json_file(str(path))
    return str(path)


def test_peak_is_the_sum_of_its_categories_and_weights_are_the_parameters(small_vocab):
    result = trace(small_vocab, "fira", rank=8, batch_size=2, seq_len=32, weights="bf16")
    assert set(result.by_category) == set(CATEGORIES)
    assert result.peak_bytes == sum(result.by_category.values())
    from fullrank.train.models import model_config

    n_params = sum(p.numel() for p in __import__("transformers").LlamaForCausalLM(model_config(small_vocab)).parameters())
    assert result.resident_bytes["weights"] >= 2 * n_params  # bf16 parameters (+ the rotary buffer)
    assert result.resident_bytes["weights"] < 2 * n_params + 4096
    assert result.settings["rank"] == 8 and result.peak_phase.endswith(("1", "2"))


def test_fira_state_is_smaller_than_adamw_state_and_layerwise_lowers_the_gradient_peak(small_vocab):
    common = dict(batch_size=1, seq_len=16, weights="bf16")
    adamw = trace(small_vocab, "adamw", **common)
    fira = trace(small_vocab, "fira", rank=4, **common)
    layerwise = trace(small_vocab, "fira", rank=4, layerwise=True, **common)
    assert fira.resident_bytes["optimizer_state"] < adamw.resident_bytes["optimizer_state"]
    assert adamw.by_category["gradients"] == adamw.resident_bytes["weights"] - 2 * 32  # all gradients (no buffer)
    assert layerwise.by_category["gradients"] < fira.by_category["gradients"] / 2


def test_activation_checkpointing_lowers_the_activation_peak(small_vocab):
    common = dict(batch_size=4, seq_len=128, weights="bf16")
    plain = trace(small_vocab, "galore", rank=8, **common)
    checkpointed = trace(small_vocab, "galore", rank=8, activation_checkpointing=True, **common)
    assert plain.peak_phase.startswith(("forward", "backward"))
    assert checkpointed.peak_bytes < 0.8 * plain.peak_bytes


@pytest.mark.parametrize("case", ["fira_fp32", "galore_bf16_layerwise", "fira_bf16_checkpointing"])
def test_trace_is_within_5_percent_of_a_real_cpu_run_measured_by_the_profiler(case):
    row = memory_check.compare("llama_tiny", case, batch_size=2, seq_len=32)
    assert abs(row["relative_error"]) <= 0.05, row


def test_largest_batch_fits_the_budget_and_one_more_does_not(small_vocab):
    settings = dict(model=small_vocab, method="galore", rank=8, seq_len=32, weights="bf16")
    first = trace(batch_size=1, **settings)
    budget = first.peak_bytes * 3
    found = largest_batch(budget, first, **settings)
    b = found["largest_batch_size"]
    assert b >= 2 and found["peak_bytes_at_largest"] <= budget
    assert trace(batch_size=b + 1, **settings).peak_bytes > budget
    assert largest_batch(first.peak_bytes / 10, first, **settings)["largest_batch_size"] == 0


def test_cli_json_has_the_peak_the_categories_and_adamw(small_vocab, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["memory", "--model", small_vocab, "--method", "apollo_mini", "--seq-len", "16", "--weights", "bf16",
                 "--budget", "0.01", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"peak_bytes", "by_category", "adamw_peak_bytes", "budget"} <= set(data)
    assert data["budget"]["fits"] and data["budget"]["largest_batch_size"] > 1
    assert data["saving_bytes"] == data["adamw_peak_bytes"] - data["peak_bytes"] > 0
    printed = capsys.readouterr().out
    assert "apollo_mini" in printed and "adamw" in printed and "budget 0.01 GiB: fits" in printed


def test_a_model_folder_reads_its_config_json(small_vocab):
    folder = str(Path(small_vocab).parent)
    assert trace(folder, "adamw", seq_len=8).peak_bytes == trace(small_vocab, "adamw", seq_len=8).peak_bytes


@pytest.mark.parametrize("argv,words", [
    (["--model", "llama_8t"], ["llama_8t", "llama_tiny", "llama_7b"]),
    (["--method", "adamx"], ["adamx", "fira", "adamw8bit"]),
    (["--method", "lora"], ["lora", "fira"]),
    (["--budget", "0"], ["--budget", "positive", "'0'"]),
    (["--budget", "lots"], ["--budget", "'lots'"]),
    (["--weights", "fp16"], ["fp16", "bf16-sr"]),
    (["--states", "4bit"], ["4bit", "8bit"]),
    (["--rank", "-3"], ["--rank", "'-3'"]),
])
def test_bad_input_is_one_line_naming_the_value_and_the_choices(argv, words, capsys):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_8bit_states_shrink_the_state_and_layerwise_adamw8bit_traces(small_vocab):
    common = dict(seq_len=8, weights="bf16")
    eight = trace(small_vocab, "fira", rank=4, states="8bit", **common)
    thirty_two = trace(small_vocab, "fira", rank=4, **common)
    # bf16 weights: 2-byte moments become 1-byte codes (+ absmax per block); P stays bf16
    assert eight.resident_bytes["optimizer_state"] < 0.7 * thirty_two.resident_bytes["optimizer_state"]
    adamw8bit = trace(small_vocab, "adamw8bit", layerwise=True, **common)
    adamw = trace(small_vocab, "adamw", layerwise=True, **common)
    assert adamw8bit.resident_bytes["optimizer_state"] < 0.55 * adamw.resident_bytes["optimizer_state"]
    assert trace(small_vocab, "fira", rank=4, weights="bf16-sr", seq_len=8).peak_bytes > 0


@pytest.mark.parametrize("argv,words", [
    (["--method", "flora", "--states", "8bit"], ["--states 8bit", "flora", "--states 32bit"]),
    (["--method", "adamw", "--weights", "bf16-sr"], ["--weights bf16-sr", "adamw", "--weights bf16"]),
])
def test_an_option_the_method_cannot_run_with_is_an_error_not_a_silent_fallback(small_vocab, argv, words, capsys):
    assert main(["memory", "--model", small_vocab, "--seq-len", "8", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("argv,words", [
    (["--weights", "fp8"], ["--weights", "fp8", "bf16-sr"]),
    (["--states", "16bit"], ["--states", "16bit", "32bit, 8bit"]),
    (["--optim-arg", "states=8bit"], ["--optim-arg states", "--states"]),
])
def test_pretrain_precision_flags_are_checked_in_one_line(argv, words, capsys):
    assert main(["pretrain", "--model", "llama_tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_pretrain_prepares_bf16_weights_with_activation_checkpointing(small_vocab):
    from fullrank.train import config as C
    from fullrank.train.models import build_model, model_config
    from fullrank.train.setup import make_optimizer, prepare_model

    cfg = C.finalize(C.build(dict(model=small_vocab, method="fira", rank=4, weights="bf16-sr", states="8bit",
                                  activation_checkpointing=True, layerwise=True)))
    model = prepare_model(build_model(model_config(small_vocab), 0), cfg)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    assert (model.is_gradient_checkpointing if checkpointing is None else checkpointing) and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    optimizer = make_optimizer(cfg, model)
    group = optimizer.param_groups[0]
    assert group["states"] == "8bit" and group["stochastic_rounding"] is True
    x = torch.randint(0, 512, (2, 16))
    model(input_ids=x, labels=x).loss.backward()  # the layer-wise hooks step during backward
    optimizer.step()
    assert optimizer.state and all(p.grad is None for p in model.parameters())


def test_finetune_weights_flag_sets_the_dtype_and_refuses_a_contradiction():
    from fullrank.finetune.training import FinetuneConfig, validate

    data = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense")
    base = dict(model="llama_tiny", data_dir=data, train=["boolq"], eval=["boolq"])
    if not Path(data).is_dir():
        pytest.skip("no commonsense data")
    assert validate(FinetuneConfig.build({**base, "weights": "bf16-sr", "states": "8bit"})).precision.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--weights bf16 loads bfloat16"):
        validate(FinetuneConfig.build({**base, "weights": "bf16", "dtype": "float16"}))
    with pytest.raises(ConfigError, match="--states: unknown state precision '4bit'; allowed: 32bit, 8bit"):
        validate(FinetuneConfig.build({**base, "states": "4bit"}))
