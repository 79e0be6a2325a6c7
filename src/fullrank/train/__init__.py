"""The pre-training pipeline behind ``fullrank pretrain`` (paper Table 2).

One concern per module: ``config`` (the run's dataclass, YAML and flags), ``models`` (LLaMA
configs), ``data`` (corpora, tokenizers, packing), ``schedule``, ``lora`` (LoRA/ReLoRA),
``distributed``, ``checkpoint``, ``metrics``, ``plot``, ``setup`` and ``loop``.
"""
from .config import TrainConfig
from .errors import ConfigError, TrainingError

__all__ = ["TrainConfig", "ConfigError", "TrainingError", "pretrain"]


def pretrain(overrides: dict) -> dict:
    """Run ``fullrank pretrain`` with config values ``overrides``; returns the summary."""
    from .loop import pretrain as _pretrain

    return _pretrain(overrides)
