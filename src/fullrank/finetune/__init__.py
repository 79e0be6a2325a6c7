"""Fine-tuning on the commonsense-reasoning benchmark (Fira paper §5.3, Table 3).

``config``: the options of ``fullrank finetune``; ``data``: tasks in the LLM-Adapters format, Alpaca
prompts and answer-only labels; ``scoring``: per-task accuracy by generation + answer extraction and
by option likelihood; ``models``: loading a causal LM (folder, ``pretrain`` run directory or config
name); ``training``: the run (on the Hugging Face ``Trainer``) and its outputs; ``cli``: ``fullrank
finetune``. The names below load on first use (the command line imports this package for ``--help``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"PROMPT_TEMPLATE": "data", "answer_options": "data", "build_prompt": "data", "encode_example": "data",
            "load_task": "data", "extract_answer": "scoring", "score_generations": "scoring",
            "score_likelihood": "scoring"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fullrank.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
