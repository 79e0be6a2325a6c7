"""Per-task accuracy, two ways.

``generate`` (LLM-Adapters' protocol): greedy decoding after the prompt, then the first allowed
answer word in the generated text (e.g. ``answer2``); a generation with no allowed word is wrong.
``likelihood``: the option whose response "the correct answer is <option>" + EOS has the highest
log-likelihood under the model; it needs no generation and never fails to produce an answer.
"""
from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE_INDEX, PromptEncoder, answer_options

from .config import SCORINGS  # noqa: F401 (the scorings' names live with the options)


def extract_answer(text: str, options: list[str]) -> str | None:
    """The first of ``options`` that appears in ``text`` as a whole word (case-insensitive), or None."""
    words = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9])({words})(?![A-Za-z0-9])", text, flags=re.IGNORECASE)
    if match is None:
        return None
    found = match.group(1).lower()
    return next(o for o in options if o.lower() == found)


def candidate_response(record: dict, option: str) -> str:
    """The record's ``output`` with its answer replaced by ``option``."""
    output, answer = record["output"], str(record["answer"])
    prefix = output[: -len(answer)] if output.endswith(answer) else "the correct answer is "
    return prefix + option


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True, file=sys.stderr, leave=False)


@torch.no_grad()
def score_generations(model, encoder: PromptEncoder, records: list[dict], batch_size: int = 16,
                      max_new_tokens: int = 32, max_length: int | None = None, progress: bool = False,
                      desc: str = "generate") -> list[dict]:
    """Greedy generations (left-padded batches) and their extracted answers; one dict per record."""
    model.eval()
    device, pad = _device(model), encoder.tokenizer.pad_token_id
    results = []
    with _bar(len(records), desc, progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            prompts = [encoder.prompt(r) for r in batch]
            if max_length:  # keep the prompt's end (question, options, answer format) when it is too long
                prompts = [p[-(max_length - max_new_tokens):] for p in prompts]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=encoder.eos)
            texts = encoder.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for record, text in zip(batch, texts):
                prediction = extract_answer(text, answer_options(record))
                results.append({"generation": text, "prediction": prediction, "correct": prediction == record["answer"]})
            bar.update(len(batch))
    return results


@torch.no_grad()
def score_likelihood(model, encoder: PromptEncoder, records: list[dict], batch_size: int = 16,
                     progress: bool = False, desc: str = "likelihood") -> list[dict]:
    """The most likely option of each record (sum of the response tokens' log-probabilities)."""
    model.eval()
    device, pad = _device(model), encoder.tokenizer.pad_token_id
    eos = [encoder.eos] if encoder.eos is not None else []
    pairs = []  # (record index, option, ids, number of prompt tokens)
    for i, record in enumerate(records):
        prompt = encoder.prompt(record)
        for option in answer_options(record):
            pairs.append((i, option, prompt + encoder.ids(candidate_response(record, option)) + eos, len(prompt)))
    scores: dict[int, dict[str, float]] = {i: {} for i in range(len(records))}
    with _bar(len(pairs), desc, progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            width = max(len(ids) for _, _, ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, _, seq, n_prompt) in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            target = labels[:, 1:].to(device)
            logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total = (logp * (target != IGNORE_INDEX)).sum(dim=1).tolist()
            for (i, option, _, _), value in zip(chunk, total):
                scores[i][option] = value
            bar.update(len(chunk))
    results = []
    for i, record in enumerate(records):
        prediction = max(scores[i], key=scores[i].get)
        results.append({"scores": scores[i], "prediction": prediction, "correct": prediction == record["answer"]})
    return results


def accuracy(results: list[dict]) -> float:
    return sum(r["correct"] for r in results) / len(results) if results else float("nan")
