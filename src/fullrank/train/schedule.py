"""Learning-rate schedule: linear warm-up, cosine decay to a floor, optional ReLoRA re-warm-ups."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupCosine:
    """lr multiplier for optimizer step ``t`` (0-based), used through ``torch.optim.lr_scheduler.LambdaLR``.

    ``(t + 1) / warmup`` for the first ``warmup`` steps, then a cosine from 1 down to ``min_ratio``
    at ``max_steps``. With ``restart_every`` (ReLoRA's jagged schedule) the multiplier is also
    ramped up again over ``restart_warmup`` steps after every restart.
    """

    max_steps: int
    warmup: int
    min_ratio: float = 0.1
    restart_every: int = 0
    restart_warmup: int = 0

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            factor = (t + 1) / self.warmup
        else:
            progress = min(1.0, (t - self.warmup) / max(1, self.max_steps - self.warmup))
            factor = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.restart_every and self.restart_warmup and t >= self.restart_every:
            factor *= min(1.0, (t % self.restart_every + 1) / self.restart_warmup)
        return factor


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``cfg`` over ``schedule_steps`` (warm-up over ``warmup_ratio`` of them, floor
    ``min_lr_ratio``); steps beyond it (an extended run) stay at the floor."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(cfg))


def schedule_fn(cfg) -> WarmupCosine:
    relora = cfg.optim.method == "relora"
    steps = cfg.optim.schedule_steps or cfg.run.max_steps
    return WarmupCosine(
        max_steps=steps,
        warmup=max(1, round(cfg.optim.warmup_ratio * steps)) if cfg.optim.warmup_ratio > 0 else 0,
        min_ratio=cfg.optim.min_lr_ratio,
        restart_every=cfg.optim.relora_every if relora else 0,
        restart_warmup=cfg.optim.relora_warmup if relora else 0,
    )


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, cfg) -> None:
    """Restore the step count of a checkpoint under ``cfg``'s plan (``load_state_dict`` alone would also
    bring back the saved plan's horizon, so ``--schedule-steps`` could not re-plan an extended run)."""
    scheduler.load_state_dict(state)
    plan = schedule_fn(cfg)
    for fn in scheduler.lr_lambdas:
        fn.__dict__.update(plan.__dict__)
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
