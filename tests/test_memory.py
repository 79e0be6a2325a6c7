"""The paper's memory estimate against exact counts of real models and measured optimizer state."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fullrank
from fullrank.memory import element_counts, estimate, optimizer_state_bytes, paper_comparison


def meta_model(config):
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def projected_shapes(model):
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ("self_attn" in name or "mlp" in name)]


@pytest.mark.parametrize("name,rank", [("llama_60m", 128), ("llama_130m", 256), ("llama_1b", 512)])
def test_element_counts_equal_a_real_model_built_on_meta(name, rank):
    from fullrank.train.models import model_config

    config = model_config(name)
    model = meta_model(config)
    weights = sum(p.numel() for p in model.parameters())
    shapes = projected_shapes(model)
    projected = sum(m * n for m, n in shapes)
    low_rank_states = sum(2 * rank * max(s) for s in shapes)
    adamw = element_counts(config, "adamw")
    fira = element_counts(config, "fira", rank)
    assert adamw == {"weights": weights, "states": 2 * weights, "total": 3 * weights}
    assert fira["weights"] == weights
    assert fira["states"] == 2 * (weights - projected) + low_rank_states
    with_p = element_counts(config, "galore", rank, count_projection=True)
    assert with_p["states"] - fira["states"] == sum(rank * min(s) for s in shapes)
    lora = element_counts(config, "lora", rank)
    assert lora["weights"] - weights == sum(rank * (m + n) for m, n in shapes)


def test_measured_state_of_a_real_llama_equals_the_count():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = fullrank.Fira(fullrank.param_groups(model, rank=8), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    counts = element_counts(config, "fira", 8, count_projection=True)
    limiter_scalars = len(projected_shapes(model))
    assert optimizer_state_bytes(opt) == 4 * (counts["states"] + limiter_scalars)


def test_paper_comparison_is_within_ten_percent():
    for row in paper_comparison():
        assert abs(row["ours_adamw"] / row["paper_adamw"] - 1) < 0.10, row
        assert abs(row["ours_fira"] / row["paper_fira"] - 1) < 0.10, row
        assert row["ours_fira"] < row["ours_adamw"]


def test_estimate_units_and_errors():
    from fullrank.train.models import model_config

    config = model_config("llama_60m")
    assert estimate(config, "adamw", unit="GB") == pytest.approx(estimate(config, "adamw") * 2**30 / 1e9)
    with pytest.raises(ValueError, match="method must be one of"):
        estimate(config, "sgd")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        estimate(config, "fira")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 512\]"):
        estimate(config, "fira", 600)
    with pytest.raises(ValueError, match="unit must be"):
        estimate(config, "adamw", unit="MB")
