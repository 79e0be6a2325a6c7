"""Answer extraction and the two scorers on hand-made records and a rigged model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fullrank.finetune.data import PromptEncoder
from fullrank.finetune.scoring import accuracy, candidate_response, extract_answer, score_generations, score_likelihood
from finetune_fixtures import word_tokenizer


@pytest.mark.parametrize("text, options, expected", [
    ("the correct answer is true", ["true", "false"], "true"),
    ("The correct answer is FALSE.", ["true", "false"], "false"),
    ("the correct answer is solution2", ["solution1", "solution2"], "solution2"),
    ("answer3 then answer1", ["answer1", "answer2", "answer3"], "answer3"),  # the first one counts
    ("the correct answer is option1", ["option1", "option2"], "option1"),
    ("the correct answer is answer4", ["answer1", "answer2", "answer3", "answer4"], "answer4"),
    ("the correct answer is answer10", ["answer1", "answer10"], "answer10"),
    ("the correct answer is", ["true", "false"], None),  # malformed: no answer word
    ("untrue statement", ["true", "false"], None),  # only whole words
    ("the correct answer is answer7", ["answer1", "answer2"], None),
])
def test_extract_answer(text, options, expected):
    assert extract_answer(text, options) == expected


def _record(answer, options=("answer1", "answer2", "answer3")):
    fmt = "/".join(options)
    return {"instruction": f"which option goes with key red ?\n\nAnswer format: {fmt}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


class RiggedLM(nn.Module):
    """Generates ``reply`` (word ids) after any prompt; its logits always favour ``favourite``."""

    def __init__(self, tokenizer, reply: str, favourite: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"]
        self.favourite = tokenizer.convert_tokens_to_ids(favourite)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        reply = torch.tensor(self.reply[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, reply], dim=1)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 5.0
        return type("Out", (), {"logits": logits})()


def test_generation_scoring_counts_malformed_output_as_wrong():
    tokenizer = word_tokenizer()
    encoder = PromptEncoder(tokenizer)
    records = [_record("answer2"), _record("answer1"), _record("answer2")]
    right = score_generations(RiggedLM(tokenizer, "the correct answer is answer2", "answer2"), encoder, records, batch_size=2)
    assert [r["correct"] for r in right] == [True, False, True] and accuracy(right) == pytest.approx(2 / 3)
    malformed = score_generations(RiggedLM(tokenizer, "the correct the correct", "answer2"), encoder, records, batch_size=2)
    assert [r["prediction"] for r in malformed] == [None] * 3 and accuracy(malformed) == 0.0


@pytest.mark.parametrize("favourite, options", [
    ("answer3", ("answer1", "answer2", "answer3")), ("false", ("true", "false")),
    ("solution1", ("solution1", "solution2")), ("option2", ("option1", "option2")),
])
def test_likelihood_scoring_picks_the_most_likely_option(favourite, options):
    tokenizer = word_tokenizer()
    records = [_record(o, options) for o in options]
    scored = score_likelihood(RiggedLM(tokenizer, "", favourite), PromptEncoder(tokenizer), records, batch_size=3)
    assert [r["prediction"] for r in scored] == [favourite] * len(options)
    assert [r["correct"] for r in scored] == [o == favourite for o in options]
    assert candidate_response(records[0], "xyz") == "the correct answer is xyz"
