"""A small pre-training loop that carries the probes, for the analysis bench and the tests.

It mirrors ``fullrank pretrain`` (warm-up + cosine schedule, the same model presets, packed
enwiki blocks with the T5 tokenizer, projected groups from ``param_groups``) and calls the probes'
hooks where a loop must: ``before_step`` once the gradients are final, ``after_step`` after
``optimizer.step()``. It writes ``metrics.jsonl``-style train records, the probe files and a
``summary.json`` with the spike metric into ``out_dir``.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .scaling_probe import PROBE_FILE, ScalingProbe, projected_weights
from .spikes import SPIKES_FILE, SpikeLogger, read_spikes, spike_summary


class Probes:
    """The probes a run carries, called together (the hook points a training loop needs)."""

    def __init__(self, *probes):
        self.probes = [p for p in probes if p is not None]

    def before_step(self, step: int) -> None:
        for probe in self.probes:
            probe.before_step(step)

    def after_step(self, step: int, loss) -> None:
        for probe in self.probes:
            if isinstance(probe, SpikeLogger):
                probe.after_step(step, loss)
            else:
                probe.after_step(step)

    def close(self) -> None:
        for probe in self.probes:
            probe.close()


def make_probes(model: nn.Module, optimizer, out_dir: str | Path, *, update_proj_gap: int,
                scaling_ranks=None, spikes: bool = True, betas=(0.9, 0.999), eps: float = 1e-8,
                target_modules=("self_attn", "mlp"), columns: int = 100, seed: int = 0,
                flush_every: int = 50) -> Probes:
    """The scaling probe (when ``scaling_ranks``) and the spike logger (when ``spikes``) of a run."""
    out_dir = Path(out_dir)
    scaling = None
    if scaling_ranks:
        scaling = ScalingProbe(projected_weights(model, target_modules), optimizer, out_dir / PROBE_FILE,
                               ranks=scaling_ranks, update_proj_gap=update_proj_gap, betas=betas, eps=eps,
                               columns=columns, seed=seed, flush_every=flush_every)
    logger = SpikeLogger(optimizer, model.parameters(), out_dir / SPIKES_FILE,
                         update_proj_gap=update_proj_gap, flush_every=flush_every) if spikes else None
    return Probes(scaling, logger)


def warmup_cosine(max_steps: int, warmup_ratio: float = 0.1, min_ratio: float = 0.1):
    """The lr multiplier of ``fullrank pretrain``'s schedule (linear warm-up, cosine to ``min_ratio``)."""
    warmup = max(1, round(warmup_ratio * max_steps)) if warmup_ratio > 0 else 0

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[torch.Tensor],
                steps: int, *, probes: Probes | None = None, scheduler=None, grad_clip: float = 0.0) -> list[float]:
    """``steps`` optimizer steps on ``batches`` (token blocks); returns the per-step losses."""
    losses = []
    model.train()
    for step, x in zip(range(steps), batches):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if probes is not None:
            probes.before_step(step)
        optimizer.step()
        if probes is not None:
            probes.after_step(step, loss.detach())
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"step {step + 1}: the training loss is {losses[-1]}; lower lr")
    if probes is not None:
        probes.close()
    return losses


def enwiki_batches(data: str, tokenizer: str, seq_len: int, batch_size: int, vocab_size: int) -> Iterator[torch.Tensor]:
    """Packed ``seq_len``-token blocks of a local corpus, ``batch_size`` at a time (corpus repeated)."""
    from ..train.corpus import LocalCorpus
    from ..train.data import PackedStream
    from ..train.tokenizer import load_tokenizer

    stream = PackedStream(LocalCorpus(data, "--data"), load_tokenizer(tokenizer), seq_len, vocab_size,
                          allow_repeat=True, warn=lambda msg: None)
    while True:
        yield stream.next_batch(batch_size)


def build_optimizer(method: str, groups, lr: float, options: dict) -> torch.optim.Optimizer:
    """``make_optimizer(method, ...)``; "flora" and "sgd" also before they are registered as presets."""
    from ..optim import flora as flora_module
    from ..optim.presets import PRESETS, make_optimizer

    baselines = {"flora": flora_module.Flora, "sgd": flora_module.SGDMomentum}
    if method in baselines and method not in PRESETS:
        return baselines[method](groups, lr=lr, **options)
    return make_optimizer(method, groups, lr=lr, **options)


def run_experiment(out_dir: str | Path, *, method: str, model: str = "llama_tiny", rank: int | None = None,
                   steps: int = 150, update_proj_gap: int = 50, lr: float | None = None, batch_size: int = 8,
                   seq_len: int = 256, seed: int = 42, scaling_ranks=None, spikes: bool = True,
                   data: str, val_data: str | None = None, tokenizer: str, eval_blocks: int = 32,
                   optim_args: dict | None = None, grad_clip: float = 0.0, scale: float | None = None) -> dict:
    """One run of the analysis bench; writes ``out_dir``/{metrics.jsonl, probe files, summary.json}."""
    from ..optim.groups import param_groups
    from ..train.models import build_model, default_rank, model_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    net = build_model(config, seed)
    rank = rank or default_rank(model, config)
    lr = lr if lr is not None else (1e-3 if method in ("adamw",) else 1e-2)
    groups = param_groups(net, rank=rank, update_proj_gap=update_proj_gap, scale=scale)
    optimizer = build_optimizer(method, groups, lr, optim_args or {})
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


PROBE_NAMES = ("scaling", "spikes")


def parse_probe_names(spec: str) -> tuple[str, ...]:
    """``"scaling,spikes"`` → ("scaling", "spikes"); "" → ()."""
    names = tuple(n.strip() for n in str(spec or "").split(",") if n.strip())
    bad = [n for n in names if n not in PROBE_NAMES]
    if bad:
        raise ValueError(f"probe must be a comma-separated subset of {', '.join(PROBE_NAMES)}, got {', '.join(bad)}")
    return names


def default_probe_ranks(model: nn.Module, target_modules=("self_attn", "mlp")) -> list[int]:
    """d/16 and d/2 of the shorter side of the projected matrices (the rebuttal's two ranks)."""
    short = min(min(p.shape) for _, p in projected_weights(model, target_modules))
    return sorted({max(1, short // 16), max(1, short // 2)})


def loop_probes(cfg, model: nn.Module, optimizer, run_dir: str | Path) -> Probes | None:
    """The probes ``fullrank pretrain`` carries for a config with ``probe`` (and ``probe_ranks``) set;
    None when ``cfg.probe`` is empty. Call on the main process only."""
    from ..train.errors import ConfigError

    try:
        names = parse_probe_names(getattr(cfg, "probe", ""))
    except ValueError as err:
        raise ConfigError(f"--probe: {err}") from None
    if not names:
        return None
    if getattr(cfg, "layerwise", False):
        raise ConfigError("--probe: not available with --layerwise (each gradient is freed during backward, "
                          "before the probes can read it); drop one of them")
    targets = tuple(cfg.target_modules)
    given = getattr(cfg, "probe_ranks", None) or []
    try:
        ranks = [int(r) for r in given]
    except (TypeError, ValueError):
        ranks = [0]
    if any(r < 1 for r in ranks):
        raise ConfigError(f"--probe-ranks: give integers >= 1 (comma-separated), got {given}")
    ranks = ranks or default_probe_ranks(model, targets)
    return make_probes(model, optimizer, run_dir, update_proj_gap=cfg.update_proj_gap,
                       scaling_ranks=ranks if "scaling" in names else None, spikes="spikes" in names,
                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, target_modules=targets, seed=cfg.seed)


def probe_summary(run_dir: str | Path) -> dict:
    """Fields for ``summary.json`` from a run's probe records: the spike metric when it logged spikes."""
    path = Path(run_dir) / SPIKES_FILE
    if not path.is_file():
        return {}
    meta, records = read_spikes(path)
    return {"spikes": spike_summary(records, meta.get("update_proj_gap", 1))}
