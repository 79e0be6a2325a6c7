"""Seeds of a parameter's random draws: every draw (a random projection, a randomized SVD's sketch,
stochastic rounding) comes from a generator seeded by the group's ``seed``, the parameter's ordinal
over all groups and the step, so that a resumed or layer-wise run draws the same numbers."""
from __future__ import annotations

import torch

_SEED_STRIDE = 1_000_003


def projection_seed(seed: int, ordinal: int, step: int) -> int:
    """The generator seed of parameter ``ordinal``'s projection drawn at ``step`` (also seeds the
    randomized SVD; stochastic rounding uses it on a stream of its own)."""
    return ((seed * _SEED_STRIDE + ordinal) * _SEED_STRIDE + step) % 2**63


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` started at ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)
