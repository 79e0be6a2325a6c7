"""The step's reads of device values on the host, and what they read as under ``FakeTensorMode``.

A step reads the device at most once (non-finite flags, convergence flags, adaptive ranks). Under
``torch._subclasses.fake_tensor.FakeTensorMode`` (``fullrank.memory.trace`` measures a step's memory
without allocating) there are no values to read: each read then answers its stated assumption, the
one that costs the most memory — gradients finite, no early refresh, every adaptive rank at its
``max_rank``.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def read(values: torch.Tensor, assumed: list) -> list:
    """``values.tolist()``, or ``assumed`` when ``values`` is a fake tensor (no data to read)."""
    if is_fake(values):
        if len(assumed) != values.numel():
            raise ValueError(f"host.read: {len(assumed)} assumed values for a tensor of {values.numel()}")
        return list(assumed)
    return values.tolist()
