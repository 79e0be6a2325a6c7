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

A transform is a unit (``components.py``): ``before(grads, states, group)`` returns the stack to
project (a new tensor: G itself may be a view of ``param.grad``), ``after(grads, low, left, right,
states, group)`` updates its state once R is known. The rules then see G̃ in place of G.
"""
from __future__ import annotations

import torch

from .components import Component, Option, Registry, choice, like_param_state
from .projector import project_back

ERROR = "error"  # state key of error feedback's buffer E
ERROR_DTYPES = {"param": None, "bfloat16": torch.bfloat16}


class Transform(Component):
    """``none``: G unchanged."""

    name = "none"
    active = False  # the engine calls before/after only for an active transform

    def before(self, grads: torch.Tensor, states: list[dict], group: dict) -> torch.Tensor:
        return grads

    def after(self, grads, low, left, right, states: list[dict], group: dict, keep=None) -> None:
        """Update the transform's state from the projected stack (``low`` = R); ``keep`` (a 0-d bool,
        layer-wise mode): when false the state stays as it was."""


def _error_buffer(param: torch.Tensor, group: dict) -> torch.Tensor:
    dtype = ERROR_DTYPES[group["error_dtype"]] or param.dtype
    return torch.zeros(param.shape, dtype=dtype, device=param.device)


class ErrorFeedback(Transform):
    """G̃ = G + E before projection; E ← G̃ − P·R after it (LDAdam's error feedback)."""

    name = "error_feedback"
    active = True
    state = {ERROR: like_param_state}  # (made in ``before`` at ``error_dtype``; declared: it keeps its dtype on load)
    options = {"error_dtype": Option("param", choice(*ERROR_DTYPES),
                                     "error feedback's buffer: at the parameter's dtype, or bfloat16")}

    def before(self, grads, states, group):
        errors = [s[ERROR] if ERROR in s else _error_buffer(g, group) for s, g in zip(states, grads.unbind(0))]
        for state, error in zip(states, errors):
            state.setdefault(ERROR, error)
        stacked = errors[0].unsqueeze(0) if len(errors) == 1 else torch.stack(errors)
        return grads + stacked.to(grads.dtype)

    def after(self, grads, low, left, right, states, group, keep=None):
        residual = grads - project_back(low, left, right)
        errors = [s[ERROR] for s in states]
        if keep is not None:
            residual = torch.where(keep, residual, torch.stack(errors).to(residual.dtype))
        torch._foreach_copy_(errors, list(residual.unbind(0)))


TRANSFORM_REGISTRY = Registry("pre-projection transform", "pre_projection", Transform)
for _transform in (Transform(), ErrorFeedback()):
    TRANSFORM_REGISTRY.register(_transform)


def register_transform(transform: Transform) -> None:
    """Make ``transform`` available as ``pre_projection=transform.name``."""
    TRANSFORM_REGISTRY.register(transform)
