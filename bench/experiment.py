"""A small pre-training run that carries the probes, for the analysis bench and the tests (not part
of the ``fullrank`` package: ``bench/analysis.py`` and ``tests/test_analysis.py`` import it by path).

It mirrors ``fullrank pretrain`` (warm-up + cosine schedule, the same model presets, packed enwiki
blocks with the T5 tokenizer, projected groups from ``param_groups``) through
``fullrank.analysis.harness.train_steps``, and writes ``metrics.jsonl``-style train records, the probe
files and a ``summary.json`` with the spike metric into ``out_dir``.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fullrank.analysis.harness import make_probes, train_steps, warmup_cosine
from fullrank.analysis.spikes import SPIKES_FILE, read_spikes, spike_summary
from fullrank import make_optimizer


def enwiki_batches(data: str, tokenizer: str, seq_len: int, batch_size: int, vocab_size: int) -> Iterator[torch.Tensor]:
    """Packed ``seq_len``-token blocks of a local corpus, ``batch_size`` at a time (corpus repeated)."""
    from fullrank.train.corpus import LocalCorpus
    from fullrank.train.data import PackedStream
    from fullrank.train.tokenizer import load_tokenizer

    stream = PackedStream(LocalCorpus(data, "--data"), load_tokenizer(tokenizer), seq_len, vocab_size,
                          allow_repeat=True, warn=lambda msg: None)
    while True:
        yield stream.next_batch(batch_size)


def run_experiment(out_dir: str | Path, *, method: str, model: str = "llama_tiny", rank: int | None = None,
                   steps: int = 150, update_proj_gap: int = 50, lr: float | None = None, batch_size: int = 8,
                   seq_len: int = 256, seed: int = 42, scaling_ranks=None, spikes: bool = True,
                   data: str, val_data: str | None = None, tokenizer: str, eval_blocks: int = 32,
                   optim_args: dict | None = None, grad_clip: float = 0.0, scale: float | None = None) -> dict:
    """One run of the analysis bench; writes ``out_dir``/{metrics.jsonl, probe files, summary.json}."""
    from fullrank import param_groups
    from fullrank.train.models import build_model, default_rank, model_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    net = build_model(config, seed)
    rank = rank or default_rank(model, config)
    lr = lr if lr is not None else (1e-3 if method in ("adamw",) else 1e-2)
    groups = param_groups(net, rank=rank, update_proj_gap=update_proj_gap, scale=scale)
    optimizer = make_optimizer(method, groups, lr=lr, **(optim_args or {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    probes = make_probes(net, optimizer, out_dir, update_proj_gap=update_proj_gap, scaling_ranks=scaling_ranks,
                         spikes=spikes, seed=seed)
    batches = enwiki_batches(data, tokenizer, seq_len, batch_size, config.vocab_size)
    start = time.perf_counter()
    losses = train_steps(net, optimizer, batches, steps, probes=probes, scheduler=scheduler, grad_clip=grad_clip)
    train_time = time.perf_counter() - start
    with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"type": "train", "step": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses))
    summary = {"model": model, "method": method, "rank": rank, "lr": lr, "steps": steps,
               "update_proj_gap": update_proj_gap, "optim_args": optim_args or {}, "seed": seed,
               "final_train_loss": sum(losses[-10:]) / min(10, len(losses)), "train_time_s": train_time}
    if val_data:
        net.eval()
        blocks = list(itertools.islice(enwiki_batches(val_data, tokenizer, seq_len, batch_size, config.vocab_size),
                                       max(1, eval_blocks // batch_size)))
        with torch.no_grad():
            val = sum(net(input_ids=x, labels=x).loss.item() for x in blocks) / len(blocks)
        summary.update(final_val_loss=val, final_val_ppl=math.exp(val))
    if spikes:
        _, records = read_spikes(out_dir / SPIKES_FILE)
        summary["spikes"] = spike_summary(records, update_proj_gap)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
