"""Helpers for the fine-tuning tests (no tests here): a tiny LLaMA with a word-level tokenizer saved
as a Hugging Face folder, and a synthetic learnable task in the LLM-Adapters format."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

KEYS = {"red": "answer1", "green": "answer2", "blue": "answer3"}  # the question's key word fixes the answer
FILLER = ["apple", "stone", "river", "cloud", "horse", "chair", "bread", "lamp", "tree", "glass", "sand", "wolf"]
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task . Write a response that appropriately completes the request "
    "### Instruction : Response Please choose the correct answer to question which option goes with key ? "
    "Answer1 Answer2 Answer3 Answer format answer1 / answer2 answer3 is true false with , paired input provides "
    "further context Input Option1 Option2 option1 option2 solution1 solution2 answer4 Answer4"
).split()


def synthetic_record(rng: random.Random) -> dict:
    key = rng.choice(sorted(KEYS))
    options = rng.sample(FILLER, 3)
    instruction = (
        f"Please choose the correct answer to the question: which option goes with key {key} ?\n\n"
        f"Answer1: {options[0]} Answer2: {options[1]} Answer3: {options[2]}\n\nAnswer format: answer1/answer2/answer3"
    )
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {KEYS[key]}", "answer": KEYS[key]}


def write_task(data_dir: Path, name: str = "keys", n_train: int = 400, n_test: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with gzip.open(data_dir / f"{name}-{split}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for _ in range(n):
                handle.write(json.dumps(synthetic_record(rng)) + "\n")
    return data_dir


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + sorted(set(TEMPLATE_WORDS + FILLER + list(KEYS) + ["the", "correct", "answer", "is"]))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def tiny_model_dir(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random-init LlamaForCausalLM folder (save_pretrained) with its word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=layers, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
