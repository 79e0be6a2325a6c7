"""Commonsense tasks in the LLM-Adapters format, Alpaca-style prompts and answer-only labels.

A task ``NAME`` is read from ``DATA_DIR/NAME-{train,test}.jsonl.gz`` (or ``.jsonl`` / ``.json``);
each record holds ``instruction``, ``input`` (empty here), ``output`` ("the correct answer is X")
and ``answer`` (X). The allowed answers come from the instruction's "Answer format: a/b/..." line.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import torch

from ..train.errors import ConfigError, first_line

# The eight tasks of the paper's Table 3 (HellaSwag has no file in ../shared/data/commonsense).
BENCHMARK_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
SPLITS = ("train", "test")
SUFFIXES = (".jsonl.gz", ".jsonl", ".json")
IGNORE_INDEX = -100  # label of the tokens left out of the loss

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:\s*/\s*[A-Za-z0-9_]+)+)")


def build_prompt(record: dict) -> str:
    """The Alpaca prompt of LLM-Adapters (up to and including "### Response:\\n")."""
    if record.get("input"):
        return PROMPT_WITH_INPUT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_TEMPLATE.format(instruction=record["instruction"])


def answer_options(record: dict) -> list[str]:
    """The allowed answers named by the instruction's "Answer format: a/b/..." line."""
    match = _FORMAT.search(record["instruction"])
    if match is None:
        raise ConfigError(f"record has no 'Answer format: a/b/...' line in its instruction: {record['instruction'][:80]!r}")
    return [option.strip() for option in match.group(1).split("/")]


def task_file(data_dir: Path, task: str, split: str) -> Path | None:
    for suffix in SUFFIXES:
        path = Path(data_dir) / f"{task}-{split}{suffix}"
        if path.is_file():
            return path
    return None


def available_tasks(data_dir: Path, split: str) -> list[str]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    names = set()
    for path in data_dir.iterdir():
        for suffix in SUFFIXES:
            if path.name.endswith(f"-{split}{suffix}"):
                names.add(path.name[: -len(f"-{split}{suffix}")])
    return sorted(names)


def check_tasks(tasks: list[str], data_dir: Path, split: str, flag: str) -> None:
    """A ConfigError naming ``flag`` unless every task has a ``split`` file in ``data_dir``."""
    if not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir: folder '{data_dir}' does not exist")
    if not tasks:
        raise ConfigError(f"{flag}: give at least one task")
    have = available_tasks(data_dir, split)
    for task in tasks:
        if task_file(data_dir, task, split) is None:
            why = "has no file there" if task in BENCHMARK_TASKS else "is unknown"
            raise ConfigError(
                f"{flag}: task '{task}' {why} ({task}-{split}.jsonl.gz in '{data_dir}'); allowed: {', '.join(have) or 'none'}"
            )


def load_task(data_dir: Path, task: str, split: str, limit: int = 0, seed: int = 0) -> list[dict]:
    """The task's records (a seeded random subset of ``limit`` records when ``limit`` > 0)."""
    path = task_file(data_dir, task, split)
    if path is None:
        raise ConfigError(f"task '{task}': no {split} file in '{data_dir}'")
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
        records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise ConfigError(f"task '{task}': cannot read '{path}': {first_line(err)}") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not {"instruction", "output", "answer"} <= set(record):
            raise ConfigError(f"task '{task}': record {i} of '{path}' lacks one of the fields instruction, output, answer")
        record["task"] = task
    if limit and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    return records


class PromptEncoder:
    """Token ids of prompts and answers with a Hugging Face tokenizer (BOS prepended when it has one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, record: dict) -> list[int]:
        return self.bos + self.ids(build_prompt(record))


def encode_example(record: dict, encoder: PromptEncoder) -> dict:
    """``input_ids`` = prompt + output + EOS; ``labels`` = IGNORE_INDEX on the prompt, so the loss
    covers exactly the answer tokens (and EOS). Prompt and answer are tokenized separately, so the
    boundary is exact and the same prompt ids are used at evaluation."""
    prompt = encoder.prompt(record)
    answer = encoder.ids(record["output"]) + ([encoder.eos] if encoder.eos is not None else [])
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_dataset(records: list[dict], encoder: PromptEncoder, cutoff_len: int) -> tuple[list[dict], int]:
    """Encoded examples of at most ``cutoff_len`` tokens, and how many longer ones were dropped."""
    examples = [encode_example(r, encoder) for r in records]
    kept = [e for e in examples if len(e["input_ids"]) <= cutoff_len]
    return kept, len(examples) - len(kept)


class PadCollator:
    """Right-pads ``input_ids`` with ``pad_id`` and ``labels`` with IGNORE_INDEX; adds ``attention_mask``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
