"""Validation of the engine's options: every bad value names the option, the parameter and the range."""
from __future__ import annotations

import math
import numbers


from .inner_adam import ADAM_CONVENTIONS
from .limiter import LIMITER_REGISTRY
from .moments import STORE_REGISTRY, require_bitsandbytes
from .projector import PROJ_TYPES
from .random_proj import stores_seed_only
from .rank import is_adaptive, max_rank_of
from .residual import RESIDUAL_CONVENTIONS, RULE_REGISTRY, SCALING_GRANULARITIES, uses_columns
from .svd import SVD_BACKENDS
from .switch import ON_SWITCH

NONFINITE_POLICIES = ("raise", "skip")
PROJECTORS = ("svd", "random")

_CHOICES = {  # the residual rules and limiters are read from their registries (they can grow)
    "proj_type": PROJ_TYPES,
    "residual_convention": RESIDUAL_CONVENTIONS,
    "svd": SVD_BACKENDS,
    "on_switch": ON_SWITCH,
    "nonfinite": NONFINITE_POLICIES,
    "projector": PROJECTORS,
    "scaling_granularity": SCALING_GRANULARITIES,
    "adam_convention": ADAM_CONVENTIONS,
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
    if group["bucket_cap_mb"] is not None:
        check_range("bucket_cap_mb", group["bucket_cap_mb"], 0.0, math.inf)
    check_choice("nonfinite", group["nonfinite"])
    check_choice("adam_convention", group["adam_convention"])
    check_choice("states", group["states"])
    require_bitsandbytes(group["states"])
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"stochastic_rounding must be True or False, got {group['stochastic_rounding']!r}")


def _choices(name: str) -> tuple:
    if name == "residual":
        return tuple(RULE_REGISTRY)
    if name == "limiter":
        return tuple(LIMITER_REGISTRY)
    if name == "states":
        return tuple(STORE_REGISTRY)
    return _CHOICES[name]


def check_choice(name: str, value) -> None:
    if value not in _choices(name):
        raise ValueError(f"{name} must be one of {_choices(name)}, got {value!r}")


def validate_projected(group: dict, names: list[str]) -> None:
    """Options of a projected group, and every parameter's shape against the rank."""
    for key in ("proj_type", "residual", "limiter", "residual_convention", "svd", "on_switch", "projector",
                "scaling_granularity"):
        check_choice(key, group[key])
    check_range("update_proj_gap", group["update_proj_gap"], 1, math.inf, integer=True)
    check_range("scale", group["scale"], 0.0, math.inf, low_open=True)
    check_range("gamma", group["gamma"], 1.0, math.inf)
    check_range("clip_threshold", group["clip_threshold"], 0.0, math.inf, low_open=True)
    check_range("limiter_alpha", group["limiter_alpha"], 0.0, 1.0, low_open=True)
    check_range("warm_iters", group["warm_iters"], 1, math.inf, integer=True)
    if not isinstance(group["refresh_stagger"], bool):
        raise ValueError(f"refresh_stagger must be True or False, got {group['refresh_stagger']!r}")
    check_range("oversample", group["oversample"], 0, math.inf, integer=True)
    check_range("power_iters", group["power_iters"], 0, math.inf, integer=True)
    check_range("scaling_multiplier", group["scaling_multiplier"], 0.0, math.inf, low_open=True)
    check_range("refresh_threshold", group["refresh_threshold"], 0.0, 1.0, high_open=True)
    check_range("refresh_beta", group["refresh_beta"], 0.0, 1.0, high_open=True)
    if uses_columns(group["residual"], group["scaling_granularity"]) and group["proj_type"] == "full":
        raise ValueError(
            f"residual={group['residual']!r} scales columns and needs a one-sided projection; "
            f"proj_type must be one of {PROJ_TYPES[:4]}, got 'full'"
        )
    _validate_adaptive(group)
    if group["svd"] == "warm" and is_adaptive(group):
        raise ValueError("svd='warm' refines the previous basis at its rank and reads no spectrum; rank_energy "
                         "(adaptive rank) needs svd in ('exact', 'randomized')")
    if group["projector"] == "random":
        if is_adaptive(group):
            raise ValueError("rank_energy (adaptive rank) reads the gradient's spectrum and needs projector='svd', "
                             "got projector='random'")
        if group["refresh_threshold"] > 0:
            raise ValueError("refresh_threshold > 0 (convergence-triggered refresh) needs projector='svd': a random "
                             "subspace captures a share of the gradient set by its dimensions, not by convergence")
        if stores_seed_only(group) and group["on_switch"] == "reproject":
            raise ValueError("on_switch='reproject' needs an orthonormal projection; with projector='random' and "
                             "residual='only_scaling' P is APOLLO's Gaussian sketch: on_switch must be one of "
                             "('keep', 'reset')")
    rank = group["rank"]
    for param, name in zip(group["params"], names):
        if param.dim() != 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}: only 2-D weights can be projected; "
                "put it in a group without 'rank'"
            )
        check_range(f"rank of parameter {name!r} {tuple(param.shape)}", rank, 1, min(param.shape), integer=True)
        if is_adaptive(group):
            check_range(f"min_rank of parameter {name!r} {tuple(param.shape)}", group["min_rank"], 1,
                        min(param.shape), integer=True)


def _validate_adaptive(group: dict) -> None:
    """``rank_energy`` η in (0, 1] (None: fixed rank), 1 ≤ min_rank ≤ max_rank."""
    if group["rank_energy"] is not None:
        check_range("rank_energy", group["rank_energy"], 0.0, 1.0, low_open=True)
    check_range("min_rank", group["min_rank"], 1, math.inf, integer=True)
    if group["max_rank"] is not None:
        check_range("max_rank", group["max_rank"], 1, math.inf, integer=True)
    if is_adaptive(group) and group["min_rank"] > max_rank_of(group):
        raise ValueError(
            f"min_rank must be an integer in [1, max_rank={max_rank_of(group)}], got {group['min_rank']!r} "
            "(min_rank > max_rank)"
        )
