"""Optimizer-state memory: what an optimizer really holds, and the paper's estimate (appendix A.8)."""
from __future__ import annotations

import torch


def _state_tensors(optimizer) -> list[torch.Tensor]:
    if hasattr(optimizer, "optimizers") and isinstance(optimizer.optimizers, dict):  # LayerwiseOptimizer
        return [t for opt in optimizer.optimizers.values() for t in _state_tensors(opt)]
    tensors = []
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments, projections, limiter norms, steps),
    each storage counted once."""
    seen, total = set(), 0
    for t in _state_tensors(optimizer):
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total
