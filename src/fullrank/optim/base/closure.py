"""The closure of ``Optimizer.step(closure)``, as torch's optimizers evaluate it."""
from __future__ import annotations

import torch


def evaluate(closure):
    """The closure's loss, computed with gradients enabled (None without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
