"""Loss-spike records and metric (paper Figs. 2, 4, 9, 10; Table 4; rebuttal Tables r4, r10).

``SpikeLogger`` keeps, per optimizer step and on the device, the training loss, the global
norm of the gradient the optimizer uses (after any clipping), and, when the optimizer has ``residual_stats()`` (the engine; the logger turns its
``record_residual_stats`` on), the residual norm
‖S‖ before and after the limiter and the fraction of matrices it scaled down; it marks the steps
where the subspace is recomputed (every ``update_proj_gap``). Nothing is read back to the host
until a flush (every ``flush_every`` steps). ``spike_summary`` finds the spikes: steps whose loss
exceeds (1 + threshold) × the median of the previous ``window`` losses.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

SPIKES_FILE = "spikes.jsonl"
RESIDUAL_FIELDS = ("residual_norm", "limited_norm", "limited_fraction")
DEFAULT_THRESHOLD = 0.1
DEFAULT_WINDOW = 20


class SpikeLogger:
    """Per-step loss, gradient norm, residual statistics and refresh marks; see the module docstring.

    ``before_step(step)`` once the gradients are final (before ``optimizer.step()``), then
    ``after_step(step, loss)`` after it (``loss`` a float or 0-d tensor); ``close()`` at the end.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params, out_path: str | Path, *,
                 update_proj_gap: int, flush_every: int = 50):
        if update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be an integer >= 1, got {update_proj_gap}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every}")
        self.optimizer, self.params = optimizer, [p for p in params if p.requires_grad]
        self.gap, self.flush_every = int(update_proj_gap), flush_every
        self.out_path = Path(out_path)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_path, "w", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)
        self._pending: list[dict] = []
        self._grad_norm: torch.Tensor | None = None
        if hasattr(optimizer, "record_residual_stats"):  # the engine records them only when asked (no cost otherwise)
            optimizer.record_residual_stats = True
        stats = getattr(optimizer, "residual_stats", None)
        self._residual_stats = stats if callable(stats) else None
        self._file.write(json.dumps({"type": "meta", "update_proj_gap": self.gap,
                                     "has_residual_stats": self._residual_stats is not None}) + "\n")

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]) if grads else torch.zeros(1)
        self._grad_norm = torch.linalg.vector_norm(norms)

    @torch.no_grad()
    def after_step(self, step: int, loss) -> None:
        record = {"step": step + 1, "refresh": step % self.gap == 0, "loss": loss, "grad_norm": self._grad_norm}
        self._grad_norm = None
        stats = self._residual_stats() if self._residual_stats is not None else None
        if stats:
            record.update({k: stats[k].detach().clone() if torch.is_tensor(stats[k]) else stats[k]
                           for k in RESIDUAL_FIELDS if k in stats})
        self._pending.append(record)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for record in self._pending:
            out = {"type": "step"}
            for key, value in record.items():
                if torch.is_tensor(value):
                    value = value.item()
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
                out[key] = value
            self._file.write(json.dumps(out) + "\n")
        self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read_spikes(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, step records) of a spikes file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPIKES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"spike records '{path}' do not exist (run with the spike logger on)")
    meta, steps = {}, []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "meta":
            meta = record
        else:
            steps.append(record)
    return meta, steps


def find_spikes(losses: list[float], threshold: float = DEFAULT_THRESHOLD, window: int = DEFAULT_WINDOW) -> list[int]:
    """Indices i where losses[i] > (1 + threshold) · median(losses[i−window:i]) (needs ≥ 3 earlier losses)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if window < 3:
        raise ValueError(f"window must be an integer >= 3, got {window}")
    spikes = []
    for i, loss in enumerate(losses):
        past = [x for x in losses[max(0, i - window):i] if x is not None and math.isfinite(x)]
        if len(past) >= 3 and loss is not None and loss > (1.0 + threshold) * statistics.median(past):
            spikes.append(i)
    return spikes


def spike_summary(steps: list[dict], update_proj_gap: int, threshold: float = DEFAULT_THRESHOLD,
                  window: int = DEFAULT_WINDOW, near: int = 5) -> dict:
    """The spike metric for ``summary.json``: spike steps, their count, how many fall within ``near``
    steps after a subspace refresh, and the residual-norm jump ‖S_t‖/‖S_{t−1}‖ at each spike."""
    losses = [s.get("loss") for s in steps]
    indices = find_spikes(losses, threshold, window)
    spike_steps = [steps[i]["step"] for i in indices]
    after_refresh = sum(1 for s in spike_steps if (s - 1) % update_proj_gap < near)
    norms = [s.get("residual_norm") for s in steps]
    jumps = []
    for i in indices:
        if i > 0 and norms[i] is not None and norms[i - 1]:
            jumps.append(norms[i] / norms[i - 1])
    all_jumps = [norms[i] / norms[i - 1] for i in range(1, len(norms)) if norms[i] is not None and norms[i - 1]]
    limited = [s.get("limited_fraction") for s in steps if s.get("limited_fraction") is not None]
    return {
        "threshold": threshold, "window": window, "spikes": len(spike_steps), "spike_steps": spike_steps,
        "max_rise": max((losses[i] / statistics.median([x for x in losses[max(0, i - window):i] if x is not None])
                         for i in indices), default=None),
        "within_steps_after_refresh": near, "spikes_after_refresh": after_refresh,
        "residual_jump_at_spikes": jumps,
        "residual_jump_median": statistics.median(all_jumps) if all_jumps else None,
        "residual_jump_max": max(all_jumps) if all_jumps else None,
        "mean_limited_fraction": sum(limited) / len(limited) if limited else None,
    }
