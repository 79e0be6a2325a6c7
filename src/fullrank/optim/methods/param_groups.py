"""``param_groups``: split a model's parameters into a projected group and a plain AdamW group."""
from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("self_attn", "mlp")


def param_groups(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    update_proj_gap: int = 200,
    scale: float | None = None,
    proj_type: str = "std",
    *,
    names: bool = True,
    **options,
) -> list[dict]:
    """Param groups for ``SubspaceAdamW`` and its presets.

    The weights of every ``nn.Linear`` whose qualified name contains one of ``target_modules``
    (GaLore's substring rule) go into a projected group carrying ``rank``, ``update_proj_gap``,
    ``proj_type``, ``scale`` (when given; else the optimizer's default) and any extra engine
    ``options``. Every other trainable parameter (embeddings, norms, biases, ``lm_head`` unless
    named) goes into a plain AdamW group.

    ``names=True``: both groups carry ``param_names`` (errors and state dicts name the parameters).
    torch then requires names in every group added later (``add_param_group``): pass ``param_names``
    with it (e.g. from ``named_parameters()``), or build the groups with ``names=False``.
    ``LayerwiseOptimizer.add_param_group`` names such a group's parameters ``param <k>`` itself.
    """
    (proj_params, proj_names), (plain_params, plain_names) = _split(model, tuple(target_modules))
    group = dict(params=proj_params, param_names=proj_names, rank=rank,
                 update_proj_gap=update_proj_gap, proj_type=proj_type, **options)
    if scale is not None:
        group["scale"] = scale
    groups = [group]
    if plain_params:
        groups.append(dict(params=plain_params, param_names=plain_names))
    if not names:
        for g in groups:
            del g["param_names"]
    logger.info(
        "param_groups: %d projected matrices (%d parameters) at rank %s, %d plain tensors (%d parameters)",
        len(proj_params), sum(p.numel() for p in proj_params), rank,
        len(plain_params), sum(p.numel() for p in plain_params),
    )
    return groups


def _split(model: nn.Module, targets: tuple[str, ...]) -> tuple[tuple[list, list], tuple[list, list]]:
    """((projected parameters, names), (plain parameters, names)) of the trainable parameters, each once."""
    if not targets:
        raise ValueError("target_modules must name at least one module, got an empty list")
    projected: set[int] = set()
    linear_names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear_names.append(module_name)
            if any(t in module_name for t in targets) and module.weight.requires_grad:
                projected.add(id(module.weight))
    if not projected:
        shown = ", ".join(linear_names[:8]) or "none"
        raise ValueError(
            f"target_modules={list(targets)} matched no nn.Linear module; the model's Linear modules are: {shown}"
        )
    split: tuple = (([], []), ([], []))
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        params, names = split[0] if id(param) in projected else split[1]
        params.append(param)
        names.append(name)
    return split
