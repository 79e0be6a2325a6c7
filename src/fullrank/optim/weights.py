"""How the step writes the weights: in their own dtype, or as bf16 with stochastic rounding.

Pure-bf16 training (GaLore's 7B recipe: no fp32 master copy) loses updates smaller than half a bf16
ulp of the weight when the new weight is rounded to nearest: with lr 1e-2 and late-training update
sizes most of them vanish. ``stochastic_rounding=True`` rounds W_t − η·u_t, computed in fp32, up or
down at random with the probabilities that make the rounding unbiased, E[bf16(x)] = x (Gupta et
al. 2015; Zamirai et al. 2020, "Revisiting BFloat16 Training"): the update survives in expectation.

A bf16 value is the top 16 bits of an fp32 one, so the rounding adds a uniform random integer in
[0, 2¹⁶) to the fp32 bits and truncates them, on the device. The random bits come from a generator
seeded by (``seed``, the parameter's position, its step): a resumed run draws the same numbers.
The fp32 working copy is one bucket's weights (or one chunk of a plain parameter's).
"""
from __future__ import annotations

import torch

from .random_proj import projection_seed

_ROUNDING_STREAM = 0x5EED  # keeps the rounding's random stream apart from the projections' (same seed)


def uses_stochastic_rounding(group: dict, param: torch.Tensor) -> bool:
    """Stochastic rounding applies to bf16 weights of a group with ``stochastic_rounding=True``."""
    return bool(group.get("stochastic_rounding")) and param.dtype == torch.bfloat16


def rounding_generator(group: dict, ordinal: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of parameter ``ordinal``'s rounding at ``step``."""
    seed = projection_seed(group["seed"] + _ROUNDING_STREAM, ordinal, step)
    return torch.Generator(device=device).manual_seed(seed)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """``target`` (bf16) ← ``value`` (fp32) rounded stochastically: unbiased, E[target] = value."""
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = noise.add_(bits).bitwise_and_(-65536)  # 0xFFFF0000: the bf16 bits, exact in fp32
    target.copy_(rounded.view(torch.float32))


def fp32_copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 working copies of bf16 weights, written back by :func:`write_back_`."""
    return [p.float() for p in params]


def write_back_(params: list[torch.Tensor], work: list[torch.Tensor], generators: list[torch.Generator]) -> None:
    """Each weight ← its fp32 working copy, stochastically rounded."""
    for param, value, generator in zip(params, work, generators):
        stochastic_round_(param, value, generator)
