"""Metrics: the ``metrics.jsonl`` log, memory measurements and the end-of-run summary table."""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class MetricsLog:
    """Appends one JSON object per line; on resume, drops the records after the resumed step."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a resumed run recomputes
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            prefix = {"train": "train", "eval": "val"}.get(record.get("type"))
            for key, value in record.items():
                if prefix and key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = key.removeprefix("val_")
                    self.tensorboard.add_scalar(f"{prefix}/{name}", value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class RankTracker:
    """Rank fields of the ``train`` records for a subspace optimizer (AdaRankGrad's rank over time).

    Every record gets ``rank_min/median/max/mean`` over the projected matrices; the per-matrix ranks
    (``ranks``) and the optimizer-state bytes at that moment (all, and the projected matrices' alone)
    are added whenever a rank changed
    (and at the first step of a session), so ``metrics.jsonl`` holds each matrix's rank as a step
    function at no cost per step. Other optimizers (AdamW, LoRA) get no fields.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.enabled = hasattr(optimizer, "rank_summary")
        self.last_ranks = None

    def fields(self) -> dict:
        if not self.enabled:
            return {}
        summary = self.optimizer.rank_summary()
        if summary["min"] is None:
            return {}
        fields = {f"rank_{k}": summary[k] for k in ("min", "median", "max", "mean")}
        if summary["ranks"] != self.last_ranks:
            from ..optim.core.state_bytes import optimizer_state_bytes, projected_state_bytes

            self.last_ranks = summary["ranks"]
            fields.update(ranks=summary["ranks"], optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
                          projected_state_bytes=projected_state_bytes(self.optimizer))
        return fields


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process_peak_rss"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _adamw_bytes(params) -> int:
    """What ``torch.optim.AdamW`` holds for ``params`` in this process (of an FSDP2 parameter: its
    shard): two moments in the parameters' dtype and a 4-byte step per tensor (computed, not run)."""
    from ..optim.base.shards import local
    return sum(2 * local(p).numel() * p.element_size() + 4 for p in params)


def memory_comparison(model: torch.nn.Module, optimizer, target_modules) -> dict:
    """The optimizer's state beside what full-rank AdamW would hold for the same model, for the whole
    model and for the projected matrices alone (the ``nn.Linear`` modules named by ``target_modules``;
    for LoRA: their frozen weights, whose adapters' state is the method's)."""
    from ..optim.core.state_bytes import optimizer_state_bytes
    from ..optim.base.shards import is_distributed_tensor

    model = getattr(model, "module", model)
    targeted = {id(p) for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and any(t in name for t in target_modules)
                for p in module.parameters(recurse=False)}
    named = list({id(p): (n, p) for n, p in model.named_parameters()}.values())
    full = [p for n, p in named if "lora_" not in n]  # the model full-rank AdamW would train
    projected = [p for n, p in named if id(p) in targeted and "lora_" not in n]
    return {
        "state_bytes": optimizer_state_bytes(optimizer),
        "adamw_state_bytes": _adamw_bytes(full),
        "projected_state_bytes": optimizer_state_bytes(optimizer, [p for _, p in named if id(p) in targeted]),
        "projected_adamw_state_bytes": _adamw_bytes(projected),
        "projected_matrices": len(projected),
        "projected_parameter_share": sum(p.numel() for p in projected) / max(1, sum(p.numel() for p in full)),
        "per_process": any(is_distributed_tensor(p) for p in full),  # FSDP2: each process's share
    }


def _saving(ours: int, adamw: int) -> str:
    if adamw <= 0:
        return ""
    change = 1 - ours / adamw
    return f"{change:.0%} less" if change >= 0 else f"{-change:.0%} more"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def memory_rows(s: dict) -> list[tuple[str, str]]:
    """The summary's optimizer-state rows: projected matrices first, then the whole model, each beside AdamW."""
    m = s.get("memory")
    if not m:
        return [("optimizer state", f"{_bytes(s['optimizer_state_bytes'])} ({s['optimizer_state_bytes']:,} bytes)")]
    return [
        ("state, projected" + (" (per process)" if m.get("per_process") else ""), (f"{_bytes(m['projected_state_bytes'])} vs {_bytes(m['projected_adamw_state_bytes'])} for AdamW: "
                              f"{_saving(m['projected_state_bytes'], m['projected_adamw_state_bytes'])} "
                              f"({m['projected_matrices']} matrices, {m['projected_parameter_share']:.0%} of the parameters)")),
        ("state, whole model" + (" (per process)" if m.get("per_process") else ""), (f"{_bytes(m['state_bytes'])} vs {_bytes(m['adamw_state_bytes'])} for AdamW: "
                                f"{_saving(m['state_bytes'], m['adamw_state_bytes'])} (embeddings, lm_head, norms: AdamW in both)")),
    ]


def format_summary(s: dict) -> str:
    """The summary as an aligned two-column table."""
    rows = [
        ("model", f"{s['model']} ({s['parameters'] / 1e6:.2f}M parameters, {s['trainable_parameters'] / 1e6:.2f}M trainable)"),
        ("method", f"{s['method']} (rank {s['rank']})" if s["method"] != "adamw" else "adamw"),
        ("steps", f"{s['steps']} ({s['tokens']:,} tokens){'  [stopped early: corpus ran out]' if s.get('stopped_early') else ''}"),
        ("final val loss", f"{s['final_val_loss']:.4f}"),
        ("final val ppl", f"{s['final_val_ppl']:.2f}"),
        *memory_rows(s),
        *([("ranks", "min {min}, median {median:g}, max {max}, mean {mean:.1f}".format(**s["final_ranks"]))]
          if s.get("final_ranks") else []),
        ("peak memory", f"{_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s ({s['world_size']} process{'es' if s['world_size'] > 1 else ''}, {s['device']})"),
        ("wall time", f"{format_duration(s['wall_time_s'])} ({format_duration(s['train_time_s'])} of it training)"),
        ("run dir", s["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])
