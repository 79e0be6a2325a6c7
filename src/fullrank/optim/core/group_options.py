"""The engine's options: its own tables, merged with every unit's declarations (``base/units.py``),
and the validation of a group against them, which resolves the group into its typed values. Every
bad value names the option, the parameter and the range; no list of a unit's option names lives here.
"""
from __future__ import annotations

import math

import torch

from ..base.options import (Option, OptionValues, check_range, choice, flag, integer, merge_options, number,
                            optional)
from ..base.units import declare, declared_tables, policies, registries
from ..units.adam import ADAM_CONVENTIONS
from ..units.limiters import LIMITER_REGISTRY
from ..units.moments import STORE_REGISTRY, require_bitsandbytes
from ..units.projection import PROJ_TYPES
from ..units.projectors import PROJECTOR_REGISTRY
from ..units.rank import is_adaptive, max_rank_of
from ..units.rules import RULE_REGISTRY
from ..units.svd import SVD_REGISTRY
from ..units.transforms import TRANSFORM_REGISTRY

NONFINITE_POLICIES = ("raise", "skip")

# Registries whose unit a projected group selects by name, with the option that selects it.
SELECTED = (RULE_REGISTRY, LIMITER_REGISTRY, SVD_REGISTRY, PROJECTOR_REGISTRY, STORE_REGISTRY, TRANSFORM_REGISTRY)


def _betas(name, value) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2) with each in [0, 1), got {value!r}")
    check_range(f"{name}[0]", value[0], 0.0, 1.0, high_open=True)
    check_range(f"{name}[1]", value[1], 0.0, 1.0, high_open=True)


def _learning_rate(name, value) -> None:
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
    "adam_convention": Option("torch", choice(*ADAM_CONVENTIONS),
                              "torch.optim.AdamW's or transformers' (units/adam.py)"),
    "nonfinite": Option("raise", choice(*NONFINITE_POLICIES), "raise, or skip the whole step, on a NaN/inf gradient"),
    "states": Option("32bit", _selects(STORE_REGISTRY), "where Adam's moments live (units/moments.py)"),
    "stochastic_rounding": Option(False, flag, "write bf16 weights by stochastic rounding (units/weights.py)"),
    "seed": Option(0, integer(0), "seeds random projections, randomized SVDs and stochastic rounding"),
    "foreach": Option(None, optional(flag), "torch._foreach_* kernels for the plain groups (False: a loop)"),
    "fused": Option(None, optional(flag), "torch's fused AdamW for the plain groups (default: where it applies: "
                                          "adam_convention='torch', 32-bit moments, unless foreach is set)"),
    "bucket_cap_mb": Option(None, optional(number(0.0)), "most stacked gradient per bucket, MiB (core/buckets.py)"),
    "capturable": Option(False, flag, "no host read in a steady step: finiteness and step counts stay on the "
                                      "device, a non-finite step is masked (needs nonfinite='skip')"),
})
# Options of projected groups, beside those of the units.
PROJECTED = declare({
    "update_proj_gap": Option(200, integer(1), "T, steps between refreshes of P"),
    "scale": Option(1.0, number(0.0, low_open=True), "α on P·ψ(R)"),
    "proj_type": Option("std", choice(*PROJ_TYPES), "GaLore's projection side"),
    "residual": Option("scale_column", _selects(RULE_REGISTRY), "the update rule (units/rules.py)"),
    "limiter": Option("norm_growth", _selects(LIMITER_REGISTRY), "the limiter of ‖S‖ (units/limiters.py)"),
    "svd": Option("exact", _selects(SVD_REGISTRY), "how a fitted P is computed (units/svd.py)"),
    "projector": Option("svd", _selects(PROJECTOR_REGISTRY), "fitted (svd) or random P (units/projectors.py)"),
    "pre_projection": Option("none", _selects(TRANSFORM_REGISTRY),
                             "a transform of G before projection (units/transforms.py)"),
    "compile": Option(False, flag, "run each bucket's step through torch.compile(fullgraph=True)"),
})
# What a group's values hold beside its declared options (``lr`` is read at each step: schedulers move it).
GROUP_KEYS = ("rank", "maximize")


def unit_options() -> dict[str, Option]:
    """The options every registered unit declares (they change when a unit is registered)."""
    return merge_options(*(unit.options for unit in policies()), *(r.options() for r in registries()))


def unit_state_keys() -> set[str]:
    """The state keys that keep their own dtype on load, as the registered units declare them."""
    units = [*policies(), *(unit for registry in registries() for unit in registry.units())]
    return {key for unit in units for key in unit.kept_dtype_keys()}


def engine_options() -> dict[str, Option]:
    """Every option a group of ``SubspaceAdamW`` takes, with its declaration."""
    return merge_options(*declared_tables(), unit_options())


def values_of(group: dict, declared: dict[str, Option]) -> OptionValues:
    """The group's values of every declared option (a unit registered after the group was made: its
    default) but ``lr``, and its ``rank`` and ``maximize``."""
    values = {name: group.get(name, option.default) for name, option in declared.items() if name != "lr"}
    values.update((key, group.get(key)) for key in GROUP_KEYS)
    return OptionValues.of(values)


def _check(group: dict, table: dict[str, Option]) -> None:
    for key, option in table.items():
        if key in group:
            option.check(key, group[key])


def validate_group(group: dict, names: list[str]) -> OptionValues:
    """Check a group's options (plain: the common ones; projected: also its units' and every
    parameter's shape against the rank) and return its values."""
    _check(group, COMMON)
    require_bitsandbytes(group["states"])
    if group.get("fused") and group.get("foreach"):
        raise ValueError("fused=True and foreach=True cannot both be set (as in torch.optim.AdamW)")
    if group.get("fused") and group.get("adam_convention") == "transformers":
        raise ValueError("fused=True steps with torch's AdamW kernel, whose convention is adam_convention='torch'; "
                         "this group has adam_convention='transformers'")
    projected = group.get("rank") is not None
    values = values_of(group, engine_options())
    if values.capturable:
        _validate_capturable(values, projected)
    if projected:
        _check(group, PROJECTED)
        _check(group, unit_options())
        _validate_projected(values, group["params"], names)
    return values


def _validate_capturable(values: OptionValues, projected: bool) -> None:
    """capturable=True refuses what it cannot do without reading the host, and what it does not mask."""
    refused = (
        (values.nonfinite == "raise", "nonfinite='raise'",
         "a step cannot raise on a NaN/inf gradient without reading it on the host; pass nonfinite='skip' "
         "(the step is then masked on the device and counted in skipped_steps)"),
        (values.stochastic_rounding, "stochastic_rounding=True", "its draws are seeded from the host's step count"),
        (values.states == "8bit", "states='8bit'", "8-bit moments are quantized outside the masked step; "
                                                   "use states='32bit'"),
        (not projected and values.adam_convention == "transformers",
         "adam_convention='transformers' in a plain group", "plain groups are stepped by torch's fused AdamW"),
        (projected and values.refresh_threshold > 0, "refresh_threshold > 0",
         "the convergence trigger reads its flags on the host every step"),
        (projected and values.pre_projection != "none",
         f"pre_projection={values.pre_projection!r}", "pre-projection transforms are not masked on the device"),
    )
    for hit, what, why in refused:
        if hit:
            raise ValueError(f"capturable=True does not support {what}: {why}")


def _validate_projected(values: OptionValues, params: list, names: list[str]) -> None:
    """Each selected unit's checks across options, 1 ≤ min_rank ≤ max_rank, and every parameter's
    shape against the rank."""
    if is_adaptive(values) and values.min_rank > max_rank_of(values):
        raise ValueError(
            f"min_rank must be an integer in [1, max_rank={max_rank_of(values)}], got {values.min_rank!r} "
            "(min_rank > max_rank)"
        )
    for registry in SELECTED:
        registry.get(values[registry.option]).validate(values)
    for param, name in zip(params, names):
        if param.dim() != 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}: only 2-D weights can be projected; "
                "put it in a group without 'rank'"
            )
        check_range(f"rank of parameter {name!r} {tuple(param.shape)}", values.rank, 1, min(param.shape),
                    integer=True)
        if is_adaptive(values):
            check_range(f"min_rank of parameter {name!r} {tuple(param.shape)}", values.min_rank, 1,
                        min(param.shape), integer=True)
