"""Pre-projection transforms (``pre_projection=``): what acts on a matrix's gradient G before it is
projected, with state of its own.

* ``none``            G as it is.
* ``error_feedback``  error feedback (Seide et al. 2014; Karimireddy et al. 2019), as LDAdam uses it
                      (Robert et al., arXiv 2410.16103, Algorithm 1): the part of the previous
                      gradients that the low-rank step did not take is added back before projecting,

                          G̃_t = G_t + E_{t−1},    R_t = Pᵀ·G̃_t,    E_t = G̃_t − P·R_t

                      so over time every direction of G reaches the subspace update. E is one m×n
                      buffer per matrix (``error``), kept at the parameter's precision or, with
                      ``error_dtype="bfloat16"``, compressed to half of fp32's bytes.

A transform is a unit (``base/units.py``): ``before(grads, states, values)`` returns the stack to
project (a new tensor: G itself may be a view of ``param.grad``), ``after(grads, low, projection)``
returns its new state once R is known (key → stacked value; the engine's writer stores it). The
rules then see G̃ in place of G.
"""
from __future__ import annotations

import torch

from ..base.options import Option, OptionValues, choice
from ..base.units import Registry, Unit
from .projection import project_back

ERROR = "error"  # state key of error feedback's buffer E
ERROR_DTYPES = {"param": None, "bfloat16": torch.bfloat16}


class Transform(Unit):
    """``none``: G unchanged."""

    name = "none"
    active = False  # the engine calls before/after only for an active transform

    def before(self, grads: torch.Tensor, states: list[dict], values: OptionValues) -> torch.Tensor:
        return grads

    def after(self, grads: torch.Tensor, low: torch.Tensor, projection: tuple) -> dict[str, torch.Tensor]:
        """The transform's new state from the projected stack (``low`` = R, ``projection`` the stacks
        (P, Q)): key → stacked value."""
        return {}


def _error_buffer(param: torch.Tensor, values: OptionValues) -> torch.Tensor:
    dtype = ERROR_DTYPES[values.error_dtype] or param.dtype
    return torch.zeros(param.shape, dtype=dtype, device=param.device)


class ErrorFeedback(Transform):
    """G̃ = G + E before projection; E ← G̃ − P·R after it (LDAdam's error feedback)."""

    name = "error_feedback"
    active = True
    state = {ERROR: None}  # (made in ``before``, at ``error_dtype``: it keeps that dtype on load)
    options = {"error_dtype": Option("param", choice(*ERROR_DTYPES),
                                     "error feedback's buffer: at the parameter's dtype, or bfloat16")}

    def before(self, grads, states, values):
        errors = [s[ERROR] if ERROR in s else _error_buffer(g, values) for s, g in zip(states, grads.unbind(0))]
        for state, error in zip(states, errors):
            state.setdefault(ERROR, error)
        stacked = errors[0].unsqueeze(0) if len(errors) == 1 else torch.stack(errors)
        return grads + stacked.to(grads.dtype)

    def after(self, grads, low, projection):
        return {ERROR: grads - project_back(low, *projection)}


TRANSFORM_REGISTRY = Registry("pre-projection transform", "pre_projection", Transform)
for _transform in (Transform(), ErrorFeedback()):
    TRANSFORM_REGISTRY.register(_transform)


def register_transform(transform: Transform) -> None:
    """Make ``transform`` available as ``pre_projection=transform.name``."""
    TRANSFORM_REGISTRY.register(transform)
