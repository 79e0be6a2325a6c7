"""Fine-tuning on the commonsense-reasoning benchmark (Fira paper §5.3, Table 3).

``data``: tasks in the LLM-Adapters format, Alpaca prompts and answer-only labels; ``scoring``:
per-task accuracy by generation + answer extraction and by option likelihood; ``models``: loading a
causal LM (folder, ``pretrain`` run directory or config name); ``training``: the run (on the Hugging
Face ``Trainer``) and its outputs; ``cli``: ``fullrank finetune``.
"""
from .data import PROMPT_TEMPLATE, answer_options, build_prompt, encode_example, load_task
from .scoring import extract_answer, score_generations, score_likelihood

__all__ = ["PROMPT_TEMPLATE", "answer_options", "build_prompt", "encode_example", "load_task",
           "extract_answer", "score_generations", "score_likelihood"]
