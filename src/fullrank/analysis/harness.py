"""The probes a training loop carries (``Probes``, ``make_probes``) and a small loop that calls their
hooks where a loop must (``train_steps``): ``before_step`` once the gradients are final, ``after_step``
after ``optimizer.step()``. Nothing here depends on ``fullrank.train``: the experiment of the analysis
bench is ``fullrank.train.experiment.run_experiment`` and ``fullrank pretrain``'s probes are built by
``fullrank.train.probes``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .scaling_probe import PROBE_FILE, ScalingProbe, projected_weights
from .spikes import SPIKES_FILE, SpikeLogger


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
