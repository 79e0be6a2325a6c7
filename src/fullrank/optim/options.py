"""Validation of the engine's options: every bad value names the option, the parameter and the range."""
from __future__ import annotations

import math
import numbers

import torch

from .limiter import LIMITERS
from .projector import PROJ_TYPES
from .residual import COLUMN_RULES, RESIDUAL_CONVENTIONS, RESIDUAL_RULES
from .svd import SVD_BACKENDS
from .switch import ON_SWITCH

NONFINITE_POLICIES = ("raise", "skip")

_CHOICES = {
    "proj_type": PROJ_TYPES,
    "residual": RESIDUAL_RULES,
    "limiter": LIMITERS,
    "residual_convention": RESIDUAL_CONVENTIONS,
    "svd": SVD_BACKENDS,
    "on_switch": ON_SWITCH,
    "nonfinite": NONFINITE_POLICIES,
}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False, integer=False):
    """Raise ValueError unless ``low (<|<=) value (<|<=) high``; the message states the range."""
    ok = _is_int(value) if integer else _is_real(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")


def validate_common(group: dict) -> None:
    """Options every group has (plain AdamW ones included)."""
    check_range("lr", group["lr"], 0.0, math.inf)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
    check_range("eps", group["eps"], 0.0, math.inf)
    check_range("weight_decay", group["weight_decay"], 0.0, math.inf)
    check_choice("nonfinite", group["nonfinite"])


def check_choice(name: str, value) -> None:
    if value not in _CHOICES[name]:
        raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")


def validate_projected(group: dict, names: list[str]) -> None:
    """Options of a projected group, and every parameter's shape against the rank."""
    for key in ("proj_type", "residual", "limiter", "residual_convention", "svd", "on_switch"):
        check_choice(key, group[key])
    check_range("update_proj_gap", group["update_proj_gap"], 1, math.inf, integer=True)
    check_range("scale", group["scale"], 0.0, math.inf, low_open=True)
    check_range("gamma", group["gamma"], 1.0, math.inf)
    check_range("clip_threshold", group["clip_threshold"], 0.0, math.inf, low_open=True)
    check_range("oversample", group["oversample"], 0, math.inf, integer=True)
    check_range("power_iters", group["power_iters"], 0, math.inf, integer=True)
    if group["residual"] in COLUMN_RULES and group["proj_type"] == "full":
        raise ValueError(
            f"residual={group['residual']!r} scales columns and needs a one-sided projection; "
            f"proj_type must be one of {PROJ_TYPES[:4]}, got 'full'"
        )
    rank = group["rank"]
    for param, name in zip(group["params"], names):
        if param.dim() != 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}: only 2-D weights can be projected; "
                "put it in a group without 'rank'"
            )
        check_range(f"rank of parameter {name!r} {tuple(param.shape)}", rank, 1, min(param.shape), integer=True)


def validate_projected_state(state: dict, param: torch.Tensor, name: str, rank: int) -> None:
    """Loaded projection state must fit the parameter and the group's rank (catches a resume from
    another configuration)."""
    m, n = param.shape
    left, right, exp_avg = state.get("proj_left"), state.get("proj_right"), state.get("exp_avg")
    if exp_avg is not None and left is None and right is None:
        raise ValueError(f"optimizer state of {name!r} has moments but no projection: it was saved by a plain group")
    if left is not None and tuple(left.shape) != (m, rank):
        raise ValueError(f"optimizer state of {name!r}: proj_left {tuple(left.shape)} does not fit a {m}×{n} weight at rank {rank}")
    if right is not None and tuple(right.shape) != (rank, n):
        raise ValueError(f"optimizer state of {name!r}: proj_right {tuple(right.shape)} does not fit a {m}×{n} weight at rank {rank}")
    if exp_avg is not None:
        rows = left.shape[1] if left is not None else m
        cols = right.shape[0] if right is not None else n
        if tuple(exp_avg.shape) != (rows, cols):
            raise ValueError(
                f"optimizer state of {name!r}: moments {tuple(exp_avg.shape)} do not match the projection ({rows}, {cols})"
            )
