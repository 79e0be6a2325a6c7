"""The engine's options: its own core table, merged with every unit's declarations (``components.py``),
and the validation of a group against them. Every bad value names the option, the parameter and the
range; no list of a unit's option names lives here.
"""
from __future__ import annotations

import math

from . import rank as rank_policy
from . import refresh, switch
from .components import Option, check_range, declare, choice, flag, integer, merge_options, number, optional
from .inner_adam import ADAM_CONVENTIONS
from .limiter import LIMITER_REGISTRY
from .moments import STORE_REGISTRY, require_bitsandbytes
from .projector import PROJ_TYPES
from .projectors import PROJECTOR_REGISTRY
from .residual import RULE_REGISTRY
from .svd import SVD_REGISTRY
from .transforms import TRANSFORM_REGISTRY

__all__ = ["check_range", "engine_options", "validate_common", "validate_projected", "unit_options", "unit_state_keys"]

NONFINITE_POLICIES = ("raise", "skip")

# Registries whose unit a group selects by name, with the option that selects it.
REGISTRIES = (RULE_REGISTRY, LIMITER_REGISTRY, SVD_REGISTRY, PROJECTOR_REGISTRY, STORE_REGISTRY, TRANSFORM_REGISTRY)


def _betas(name, value) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2) with each in [0, 1), got {value!r}")
    check_range(f"{name}[0]", value[0], 0.0, 1.0, high_open=True)
    check_range(f"{name}[1]", value[1], 0.0, 1.0, high_open=True)


def _learning_rate(name, value) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} as a tensor must hold one floating-point value, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        value = float(value) if not value.is_meta else 0.0
    check_range(name, value, 0.0, math.inf)


def _selects(registry):
    """The check of the option that selects a unit of ``registry`` (its names, read when checked)."""
    return lambda name, value: registry.get(value)


# Options every group has (plain AdamW groups too).
COMMON = declare({
    "lr": Option(1e-3, _learning_rate, "η"),
    "betas": Option((0.9, 0.999), _betas, "Adam's (β1, β2)"),
    "eps": Option(1e-8, number(0.0), "Adam's ε"),
    "weight_decay": Option(0.0, number(0.0), "λ, decoupled and scaled by η"),
    "adam_convention": Option("torch", choice(*ADAM_CONVENTIONS), "torch.optim.AdamW's or transformers' (inner_adam.py)"),
    "nonfinite": Option("raise", choice(*NONFINITE_POLICIES), "raise, or skip the whole step, on a NaN/inf gradient"),
    "states": Option("32bit", _selects(STORE_REGISTRY), "where Adam's moments live (moments.py)"),
    "stochastic_rounding": Option(False, flag, "write bf16 weights by stochastic rounding (weights.py)"),
    "seed": Option(0, integer(0), "seeds random projections, randomized SVDs and stochastic rounding"),
    "foreach": Option(None, optional(flag), "torch._foreach_* kernels for the plain groups (False: a loop)"),
    "fused": Option(None, optional(flag), "torch's fused AdamW for the plain groups (default: where it applies: "
                                          "adam_convention='torch', 32-bit moments, unless foreach is set)"),
    "bucket_cap_mb": Option(None, optional(number(0.0)), "most stacked gradient per bucket, MiB (engine.py)"),
    "capturable": Option(False, flag, "no host read in a steady step: finiteness and step counts stay on the "
                                      "device, a non-finite step is masked (needs nonfinite='skip')"),
})
# Options of projected groups, beside those of the units.
PROJECTED = declare({
    "update_proj_gap": Option(200, integer(1), "T, steps between refreshes of P"),
    "scale": Option(1.0, number(0.0, low_open=True), "α on P·ψ(R)"),
    "proj_type": Option("std", choice(*PROJ_TYPES), "GaLore's projection side"),
    "residual": Option("scale_column", _selects(RULE_REGISTRY), "the update rule (residual.py)"),
    "limiter": Option("norm_growth", _selects(LIMITER_REGISTRY), "the limiter of ‖S‖ (limiter.py)"),
    "svd": Option("exact", _selects(SVD_REGISTRY), "how a fitted P is computed (svd.py)"),
    "projector": Option("svd", _selects(PROJECTOR_REGISTRY), "fitted (svd) or random P (projectors.py)"),
    "pre_projection": Option("none", _selects(TRANSFORM_REGISTRY), "a transform of G before projection (transforms.py)"),
    "compile": Option(False, flag, "run each bucket's step through torch.compile(fullgraph=True)"),
})


def unit_options() -> dict[str, Option]:
    """The options every registered unit declares (they change when a unit is registered)."""
    return merge_options(rank_policy.OPTIONS, refresh.OPTIONS, switch.OPTIONS, *(r.options() for r in REGISTRIES))


def unit_state_keys() -> set[str]:
    """The state keys the registered units declare (their tensors keep their own dtype on load)."""
    return {key for registry in REGISTRIES for unit in registry.units() for key in unit.state}


def engine_options() -> dict[str, Option]:
    """Every option a group of ``SubspaceAdamW`` takes, with its declaration."""
    return merge_options(COMMON, PROJECTED, unit_options())


def _check(group: dict, table: dict[str, Option]) -> None:
    for key, option in table.items():
        if key in group:
            option.check(key, group[key])


def validate_common(group: dict) -> None:
    """Options every group has (plain AdamW ones included)."""
    _check(group, COMMON)
    require_bitsandbytes(group["states"])
    if group.get("fused") and group.get("foreach"):
        raise ValueError("fused=True and foreach=True cannot both be set (as in torch.optim.AdamW)")
    if group.get("fused") and group.get("adam_convention") == "transformers":
        raise ValueError("fused=True steps with torch's AdamW kernel, whose convention is adam_convention='torch'; "
                         "this group has adam_convention='transformers'")
    if group.get("capturable"):
        _validate_capturable(group)


def _validate_capturable(group: dict) -> None:
    """capturable=True refuses what it cannot do without reading the host, and what it does not mask."""
    projected = group.get("rank") is not None
    refused = (
        (group.get("nonfinite") == "raise", "nonfinite='raise'",
         "a step cannot raise on a NaN/inf gradient without reading it on the host; pass nonfinite='skip' "
         "(the step is then masked on the device and counted in skipped_steps)"),
        (group.get("stochastic_rounding"), "stochastic_rounding=True", "its draws are seeded from the host's step count"),
        (group.get("states") == "8bit", "states='8bit'", "8-bit moments are quantized outside the masked step; "
                                                          "use states='32bit'"),
        (not projected and group.get("adam_convention") == "transformers",
         "adam_convention='transformers' in a plain group", "plain groups are stepped by torch's fused AdamW"),
        (projected and group.get("refresh_threshold", 0.0) > 0, "refresh_threshold > 0",
         "the convergence trigger reads its flags on the host every step"),
        (projected and group.get("pre_projection", "none") != "none",
         f"pre_projection={group.get('pre_projection')!r}", "pre-projection transforms are not masked on the device"),
    )
    for hit, what, why in refused:
        if hit:
            raise ValueError(f"capturable=True does not support {what}: {why}")


def validate_projected(group: dict, names: list[str]) -> None:
    """Options of a projected group (each declared check, then each selected unit's checks across
    options), and every parameter's shape against the rank."""
    _check(group, PROJECTED)
    _check(group, unit_options())
    _validate_adaptive(group)
    for registry in REGISTRIES:
        registry.get(group[registry.option]).validate(group)
    rank = group["rank"]
    for param, name in zip(group["params"], names):
        if param.dim() != 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}: only 2-D weights can be projected; "
                "put it in a group without 'rank'"
            )
        check_range(f"rank of parameter {name!r} {tuple(param.shape)}", rank, 1, min(param.shape), integer=True)
        if rank_policy.is_adaptive(group):
            check_range(f"min_rank of parameter {name!r} {tuple(param.shape)}", group["min_rank"], 1,
                        min(param.shape), integer=True)


def _validate_adaptive(group: dict) -> None:
    """1 ≤ min_rank ≤ max_rank for an adaptive group."""
    if rank_policy.is_adaptive(group) and group["min_rank"] > rank_policy.max_rank_of(group):
        raise ValueError(
            f"min_rank must be an integer in [1, max_rank={rank_policy.max_rank_of(group)}], got {group['min_rank']!r} "
            "(min_rank > max_rank)"
        )
