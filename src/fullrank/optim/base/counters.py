"""The step counters that every parameter's state holds: ints, or 0-d fp32 tensors on the device
under ``capturable=True`` (as torch's capturable AdamW keeps its ``step``)."""
from __future__ import annotations

import torch

STEP = "step"  # optimizer steps taken on this parameter
ADAM_STEP = "adam_step"  # steps since Adam's moments were last reset (bias correction; projected matrices)
COUNTER_KEYS = (STEP, ADAM_STEP)


def advance(states: list[dict], keys: tuple[str, ...], keep: torch.Tensor | None) -> None:
    """Count a step: +1 on int counters; on 0-d device counters +keep, so that a masked step is not
    counted."""
    for key in keys:
        counters = [s[key] for s in states]
        if isinstance(counters[0], torch.Tensor):
            torch._foreach_add_(counters, [keep.to(counters[0].dtype)] * len(counters))
        else:
            for state in states:
                state[key] += 1
