"""Prompts, answer formats and loss masking of ``fullrank finetune``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fullrank.finetune import data as D
from fullrank.train.errors import ConfigError
from finetune_fixtures import tiny_model_dir, word_tokenizer, write_task

COMMONSENSE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "commonsense"
EXPECTED_OPTIONS = {
    "boolq": ["true", "false"], "piqa": ["solution1", "solution2"], "social_i_qa": ["answer1", "answer2", "answer3"],
    "winogrande": ["option1", "option2"], "openbookqa": ["answer1", "answer2", "answer3", "answer4"],
}
RECORD = {"instruction": "Please answer: is the sky blue?\n\nAnswer format: true/false", "input": "",
          "output": "the correct answer is true", "answer": "true"}


def test_prompt_is_the_alpaca_template_of_llm_adapters():
    prompt = D.build_prompt(RECORD)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nPlease answer: is the sky blue?\n\nAnswer format: true/false\n\n### Response:\n"
    )
    assert "### Input:\ncontext" in D.build_prompt({**RECORD, "input": "context"})


@pytest.mark.skipif(not COMMONSENSE.is_dir(), reason="../shared/data/commonsense is not present")
@pytest.mark.parametrize("task", sorted(EXPECTED_OPTIONS))
def test_answer_options_of_the_real_test_sets(task):
    records = D.load_task(COMMONSENSE, task, "test", limit=20, seed=0)
    assert len(records) == 20
    for record in records:
        assert D.answer_options(record) == EXPECTED_OPTIONS[task]
        assert record["answer"] in EXPECTED_OPTIONS[task] and record["output"].endswith(record["answer"])


def test_answer_options_needs_a_format_line():
    with pytest.raises(ConfigError, match="Answer format"):
        D.answer_options({**RECORD, "instruction": "no format here"})


def test_labels_cover_exactly_the_answer_tokens():
    tokenizer = word_tokenizer()
    encoder = D.PromptEncoder(tokenizer)
    example = D.encode_example({**RECORD, "instruction": "which option goes with key red ?\n\nAnswer format: answer1/answer2"}, encoder)
    ids, labels = example["input_ids"], example["labels"]
    answer = tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(ids) - len(answer)
    assert ids[n_prompt:] == answer
    assert labels[:n_prompt] == [D.IGNORE_INDEX] * n_prompt and labels[n_prompt:] == answer
    assert ids[:n_prompt] == encoder.prompt({**RECORD, "instruction": "which option goes with key red ?\n\nAnswer format: answer1/answer2"})


def test_model_loss_is_the_mean_over_answer_tokens_only(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "m"))
    tokenizer = word_tokenizer()
    records = [{**RECORD, "output": f"the correct answer is {a}", "answer": a} for a in ("true", "false")]
    batch = D.PadCollator(tokenizer.pad_token_id)([D.encode_example(r, D.PromptEncoder(tokenizer)) for r in records])
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = batch["labels"][:, 1:]
    picked = [(-logp[b, t, target[b, t]]) for b in range(2) for t in range(target.shape[1]) if target[b, t] != D.IGNORE_INDEX]
    assert len(picked) == 2 * 6  # "the correct answer is X" + EOS, per record
    torch.testing.assert_close(loss, torch.stack(picked).mean())
    assert batch["attention_mask"][1].sum() == len(D.encode_example(records[1], D.PromptEncoder(tokenizer))["input_ids"])


def test_unknown_task_and_missing_folder_are_one_line_errors(tmp_path):
    write_task(tmp_path, "keys", 10, 5)
    with pytest.raises(ConfigError, match=r"--train: task 'nope' is unknown .*allowed: keys"):
        D.check_tasks(["nope"], tmp_path, "train", "--train")
    with pytest.raises(ConfigError, match=r"--eval: task 'piqa' has no file there"):
        D.check_tasks(["piqa"], tmp_path, "test", "--eval")
    with pytest.raises(ConfigError, match="--data-dir: folder"):
        D.check_tasks(["keys"], tmp_path / "absent", "train", "--train")


def test_subsets_are_seeded_and_long_examples_dropped(tmp_path):
    write_task(tmp_path, "keys", 50, 5)
    a = D.load_task(tmp_path, "keys", "train", limit=10, seed=1)
    assert a == D.load_task(tmp_path, "keys", "train", limit=10, seed=1) and len(a) == 10
    encoder = D.PromptEncoder(word_tokenizer())
    kept, dropped = D.encode_dataset(a, encoder, cutoff_len=20)
    assert kept == [] and dropped == 10
    kept, dropped = D.encode_dataset(a, encoder, cutoff_len=256)
    assert len(kept) == 10 and dropped == 0
