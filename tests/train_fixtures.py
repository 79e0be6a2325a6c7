"""Tiny corpora, a word-level tokenizer and a micro LLaMA config for the pipeline tests (a few KB)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour", "the child"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "carries", "watches", "feeds"]
OBJECTS = ["the ball", "a red apple", "the green door", "a long river", "the tall tree", "a quiet house", "the blue sky"]
ENDINGS = ["today", "again", "in the morning", "at night", "with care", "every day"]


def documents(n_docs: int = 24, sentences: int = 12, seed: int = 0) -> list[str]:
    """Deterministic, learnable English-like documents (subject verb object ending .)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = [f"story {d}"]
        for _ in range(sentences):
            lines.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)} .")
        docs.append(" ".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return path


def write_tokenizer(path: Path, docs: list[str]) -> Path:
    """A word-level ``tokenizer.json`` with <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))
    return path


def write_model_config(path: Path, vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 2,
                       max_positions: int = 64) -> Path:
    path.write_text(json.dumps({
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden + 24,
        "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": layers,
        "max_position_embeddings": max_positions, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    }), encoding="utf-8")
    return path


def setup_tiny(tmp: Path) -> dict:
    """Paths of a tiny train/val corpus, tokenizer and model config under ``tmp``."""
    docs = documents(24, seed=0)
    return {
        "data": write_jsonl(tmp / "train.jsonl", docs),
        "val": write_jsonl(tmp / "val.jsonl", documents(4, seed=1)),
        "tokenizer": write_tokenizer(tmp / "tokenizer.json", docs + documents(4, seed=1)),
        "model": write_model_config(tmp / "micro.json"),
    }


def tiny_argv(paths: dict, out: Path, **flags) -> list[str]:
    """``fullrank pretrain`` arguments of a micro run; ``flags`` (underscored names) override."""
    values = {
        "model": paths["model"], "data": paths["data"], "val_data": paths["val"], "tokenizer": paths["tokenizer"],
        "method": "fira", "rank": 8, "seq_len": 32, "batch_size": 4, "grad_accum": 1, "max_steps": 20,
        "eval_every": 10, "eval_tokens": 256, "save_every": 0, "update_proj_gap": 10, "out_dir": out, "seed": 0,
        "threads": 1,  # the same thread count in every run and resumption: identical float reductions
    }
    values.update(flags)
    argv = ["pretrain", "--no-progress"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Micro models run fastest on one thread, and a busy shared CPU stalls multi-threaded kernels."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
