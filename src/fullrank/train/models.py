"""LLaMA model configurations of the paper (Table 5), built with Hugging Face ``transformers``.

Every preset is a ``LlamaConfig`` (RMSNorm, SwiGLU MLP, rotary position embeddings) with the T5
vocabulary (32,000 tokens) and 1,024 positions, as GaLore's ``configs/llama_*.json``; no weights are
downloaded: the model is initialised from the seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import ConfigError, first_line

VOCAB_SIZE = 32000
MAX_POSITIONS = 1024

# name: (hidden_size, intermediate_size, attention heads, layers)
MODEL_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llama_tiny": (128, 352, 4, 4),  # CPU demo: ~9.0M parameters, 8.2M of them embeddings + lm_head
    "llama_20m": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_350m": (1024, 2736, 16, 24),
    "llama_1b": (2048, 5461, 32, 24),
    "llama_7b": (4096, 11008, 32, 32),
    "llama_13b": (5120, 13824, 40, 40),  # LLaMA-2 13B
    "llama_70b": (8192, 28672, 64, 80),  # LLaMA-2 70B (grouped-query attention: KEY_VALUE_HEADS)
}
MODEL_NAMES = tuple(MODEL_SHAPES)
# key-value heads where they are fewer than the attention heads (grouped-query attention)
KEY_VALUE_HEADS = {"llama_70b": 8}

# Paper Table 2 (rank / d_model row) and GaLore's 7B run; the CPU presets use d_model / 4. 13B and
# 70B (no paper run) keep the d_model / 4 of the 60M, 350M, 1B and 7B rows, capped by the smallest
# projected dimension: 1280, and 1024 for 70B (d_model / 4 = 2048, but its k_proj and v_proj are
# 1024 x 8192: 8 key-value heads of 128).
DEFAULT_RANKS = {
    "llama_tiny": 32, "llama_20m": 64, "llama_60m": 128, "llama_130m": 256,
    "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024, "llama_13b": 1280, "llama_70b": 1024,
}
# Fira's α: 0.25 below 1B parameters, 0.0625 for the 1B and 7B models (paper appendix A.2) and above.
LARGE_MODELS = ("llama_1b", "llama_7b", "llama_13b", "llama_70b")


def model_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset name or of a ``config.json`` file."""
    if name in MODEL_SHAPES:
        hidden, inter, heads, layers = MODEL_SHAPES[name]
        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=inter,
            num_attention_heads=heads, num_key_value_heads=KEY_VALUE_HEADS.get(name, heads), num_hidden_layers=layers,
            max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6, hidden_act="silu",
            initializer_range=0.02, tie_word_embeddings=False, use_cache=False,
            pad_token_id=0, bos_token_id=None, eos_token_id=1,
        )
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--model: config file '{name}' does not exist; give one of {', '.join(MODEL_NAMES)} or a LlamaConfig .json file")
        try:
            config = LlamaConfig.from_json_file(str(path))
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"--model: cannot read LlamaConfig from '{name}': {first_line(err)}") from None
        config.use_cache = False
        return config
    raise ConfigError(f"--model: unknown model '{name}'; allowed: {', '.join(MODEL_NAMES)}, or a path to a LlamaConfig .json file")


def default_rank(name: str, config: LlamaConfig) -> int:
    """Table 2's rank for a preset, d_model / 4 otherwise."""
    return DEFAULT_RANKS.get(name, max(1, config.hidden_size // 4))


def default_scale(name: str) -> float:
    return 0.0625 if name in LARGE_MODELS else 0.25


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` (fp32 weights), deterministic in ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def projected_linears(model: nn.Module, target_modules) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of every ``nn.Linear`` whose name contains a target (GaLore's rule)."""
    return [
        (name, tuple(module.weight.shape))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in target_modules)
    ]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation (gradient) checkpointing of every decoder layer, non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the older name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"--activation-checkpointing: {type(model).__name__} is not a transformers model")
