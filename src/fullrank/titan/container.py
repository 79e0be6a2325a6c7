"""fullrank's optimizers as torchtitan optimizers: an ``OptimizersContainer`` that resolves every
fullrank method by name, and a config helper that builds its projected and plain groups.

torchtitan assigns each parameter to the first ``ParamGroupConfig`` whose ``pattern`` matches its
FQN and builds one optimizer per ``optimizer_name`` and model part from the matched groups. Here an
``optimizer_name`` may also be any name of ``fullrank.optimizer_methods()``: the groups then go to
``fullrank.make_optimizer(name, groups, **optimizer_factory_kwargs_by_name[name])``, exactly as
``fullrank.param_groups`` would hand them over. A group whose ``optimizer_kwargs`` carry ``rank`` is
projected (its 2-D weights get the low-rank state); a group without is plain AdamW.

The optimizer state of a ``SubspaceAdamW`` (projections of another shape than the weight, their ranks,
step counters, seeds) is saved in fullrank's own DCP layout (``fullrank.optim.distributed_state_dict``)
and loaded from the checkpoint folder by ``fullrank.titan.CheckpointManager``; torch's optimizers in the
same container keep torchtitan's flat layout.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.components.optimizer.utils import (
    get_flat_optim_state_dict,
    init_optim_state,
    load_flat_optim_state_dict,
)

import fullrank
from fullrank.train.fsdp import materialize_state

__all__ = ["LLAMA3_PROJECTED_PATTERN", "SubspaceOptimizersContainer", "subspace_optimizer"]

# The transformer's linear weights in torchtitan's Llama 3 (and any decoder naming them the same way):
# attention.qkv_linear.wqkv (or wq, wk, wv), attention.wo, feed_forward.w1, w2, w3. Searched in the raw
# FQN, so activation checkpointing's wrapper segment in between does not matter; the norms
# (attention_norm, ffn_norm), tok_embeddings, norm and lm_head do not match.
LLAMA3_PROJECTED_PATTERN = r"\.(attention|feed_forward)\.(qkv_linear\.)?w[a-z0-9]*\.weight$"

# torchtitan's own optimizer names (OptimizersContainer._resolve_optimizer_factory)
TORCHTITAN_OPTIMIZERS = ("Adam", "AdamW", "DistMuon")
# Keys of a group that are not options (torch's own, and fullrank's mark of a projected group).
_GROUP_KEYS = ("params", "param_names", "rank")


class _CanonicalParameterNames:
    """A model part seen through torchtitan's canonical FQNs (no activation-checkpoint wrapper
    segment): the names fullrank's checkpoint keys are written with, so that a run resumes whether or
    not activation checkpointing wraps the blocks, like torchtitan's own model and optimizer keys."""

    def __init__(self, module: nn.Module):
        self._module = module

    def named_parameters(self, *args, **kwargs):
        for name, param in self._module.named_parameters(*args, **kwargs):
            yield canonical_fqn(name), param


def _check_group_options(optimizer: torch.optim.Optimizer, method: str, configs: list[ParamGroupConfig]) -> None:
    """Refuse the ``optimizer_kwargs`` the optimizer does not have as group options (the engine keeps
    unknown group keys without reading them, so a misspelt option would otherwise pass silently)."""
    known = set(optimizer.defaults) | set(_GROUP_KEYS)
    for config in configs:
        unknown = sorted(set(config.optimizer_kwargs) - known)
        if unknown:
            options = ", ".join(sorted(known - {"params", "param_names"}))
            raise ValueError(
                f"ParamGroupConfig(pattern={config.pattern!r}, optimizer_name={method!r}): unknown optimizer_kwargs "
                f"{', '.join(map(repr, unknown))}; the group options of fullrank method {method!r} are: {options}. "
                f"Arguments of the whole optimizer that are not group options (e.g. Fira's scaling, APOLLO's "
                f"apollo_scale) go in optimizer_factory_kwargs_by_name[{method!r}]")


class SubspaceOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also builds fullrank's optimizers.

    ``optimizer_name`` is a fullrank method (``fullrank.optimizer_methods()``: ``fira``, ``galore``,
    ``apollo``, ``adarankgrad``, …) or one of torchtitan's (``Adam``, ``AdamW``, ``DistMuon``). For a
    fullrank method, ``optimizer_kwargs`` are the group's options (``rank`` marks a projected group;
    ``update_proj_gap`` T, ``scale`` α, ``gamma`` γ, ``states``, …: any option the method takes, checked
    by fullrank, unknown ones refused by name) and ``optimizer_factory_kwargs_by_name[name]`` the
    optimizer's own arguments. ``implementation`` (fused / foreach / for-loop) applies to torchtitan's
    optimizers only: fullrank's plain groups run torch's fused AdamW kernel where it applies, or what
    their ``fused`` / ``foreach`` options choose.

    The container keeps torchtitan's contract: ``step``/``zero_grad`` over every optimizer of every
    model part; ``state_dict`` is the flat dict DCP saves (fullrank's layout for a ``SubspaceAdamW``,
    torchtitan's for the others). Loading goes through :meth:`load_checkpoint` (called by
    ``fullrank.titan.CheckpointManager``), which reads the shapes of fullrank's state from the
    checkpoint's metadata; ``load_state_dict`` refuses fullrank's state with that explanation.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        if name in fullrank.optimizer_methods():
            return functools.partial(fullrank.make_optimizer, name)
        if name in TORCHTITAN_OPTIMIZERS:
            return OptimizersContainer._resolve_optimizer_factory(name)
        raise ValueError(f"optimizer_name must be a fullrank method ({', '.join(fullrank.optimizer_methods())}) or "
                         f"one of torchtitan's ({', '.join(TORCHTITAN_OPTIMIZERS)}), got {name!r}")

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        impl_kwargs = self._build_impl_kwargs(config)
        configs_by_name: dict[str, list[ParamGroupConfig]] = {}
        for group_config in config.param_groups:
            configs_by_name.setdefault(group_config.optimizer_name, []).append(group_config)
        self.optimizers = []
        self.model_parts = model_parts
        self._parts: list[nn.Module] = []  # the model part of each optimizer
        self._checkpoint_prefixes: list[str | None] = []  # fullrank's DCP key prefix of each optimizer
        all_params = []
        for part_index, model in enumerate(model_parts):
            groups_by_name, patterns_by_name = self._build_param_groups(model, config.param_groups, {})
            for name, groups in groups_by_name.items():
                factory = self._resolve_optimizer_factory(name)
                is_fullrank = name in fullrank.optimizer_methods()
                if not is_fullrank:  # torchtitan's optimizers take its implementation kwargs, as in its container
                    groups = [{**impl_kwargs, **group} for group in groups]
                optimizer = factory(groups, **config.optimizer_factory_kwargs_by_name.get(name, {}))
                if is_fullrank:  # every config of this name matched a group (torchtitan refuses an empty match)
                    _check_group_options(optimizer, name, configs_by_name[name])
                self.optimizers.append(optimizer)
                self._parts.append(model)
                self._checkpoint_prefixes.append(
                    f"fullrank.{name}.{groups[0]['param_names'][0]}"
                    if isinstance(optimizer, fullrank.SubspaceAdamW) else None)
                self._log_optimizer(optimizer, part_index, patterns_by_name[name])
                for group in groups:
                    all_params.extend(group["params"])
        self._validate_params(all_params)
        if config.implementation == "fused_opt_states_bf16":
            self._register_bf16_optimizer_state_hook()
        self._post_init(all_params)

    def state_dict(self) -> dict[str, Any]:
        """The flat dict DCP saves: per ``SubspaceAdamW`` its state in fullrank's layout (FSDP2 shares
        as DTensors of the whole tensors, under ``<prefix>/state/<FQN>/<key>``, whatever their shape),
        per other optimizer torchtitan's FQN-keyed flat dict."""
        out: dict[str, Any] = {}
        for optimizer, part, prefix in zip(self.optimizers, self._parts, self._checkpoint_prefixes):
            if prefix is not None:
                named = _CanonicalParameterNames(part)
                out.update(fullrank.optim.distributed_state_dict(optimizer, named, prefix=prefix))
            else:
                init_optim_state(optimizer)
                out.update(get_flat_optim_state_dict(optimizer))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any(prefix is not None for prefix in self._checkpoint_prefixes):
            raise RuntimeError(
                "fullrank's optimizer state is loaded from the checkpoint folder (the shapes of its projections "
                "and moments are read from the checkpoint's metadata): build the checkpointer from "
                "fullrank.titan.CheckpointManager.Config, which calls SubspaceOptimizersContainer.load_checkpoint")
        super().load_state_dict(state_dict)

    def load_checkpoint(self, checkpoint_id: str, key: str = "optimizer") -> None:
        """Load every optimizer's state from the DCP checkpoint ``checkpoint_id`` (a local folder),
        where ``state_dict`` was saved under ``key`` (torchtitan's ``OPTIMIZER``); any world size."""
        import torch.distributed.checkpoint as dcp

        torch_optimizers = []
        for optimizer, part, prefix in zip(self.optimizers, self._parts, self._checkpoint_prefixes):
            if prefix is not None:
                fullrank.optim.load_distributed_state_dict(optimizer, _CanonicalParameterNames(part),
                                                           str(checkpoint_id), prefix=f"{key}.{prefix}")
            else:
                materialize_state(optimizer)
                torch_optimizers.append(optimizer)
        if not torch_optimizers:
            return
        flat = {}
        for optimizer in torch_optimizers:
            flat.update(get_flat_optim_state_dict(optimizer))
        template = {f"{key}.{name}": value for name, value in flat.items()}
        dcp.load(template, checkpoint_id=str(checkpoint_id))
        loaded = {name: template[f"{key}.{name}"] for name in flat}
        for optimizer in torch_optimizers:
            load_flat_optim_state_dict(optimizer, loaded)


def subspace_optimizer(
    method: str = "fira",
    *,
    lr: float = 1e-2,
    rank: int = 128,
    weight_decay: float = 0.0,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    projected_pattern: str = LLAMA3_PROJECTED_PATTERN,
    **projected_options,
) -> SubspaceOptimizersContainer.Config:
    """The container's config for one fullrank ``method``: the weights matching ``projected_pattern``
    (by default the transformer's linear weights) in a projected group at ``rank``, with T =
    ``update_proj_gap``, α = ``scale`` and ``projected_options`` (``gamma``, ``states``, ``svd``, …);
    every other parameter (embeddings, norms, ``lm_head``) in a plain AdamW group; both groups at ``lr``,
    ``weight_decay``, ``betas`` and ``eps``. An option left at None is not written: the method's own
    default applies (for Fira and GaLore the paper's T = 200 and α = 0.25), and methods that do not take
    it (Flora, SGD) are not handed it. Only the options written appear on torchtitan's command line."""
    if not isinstance(method, str) or method not in fullrank.optimizer_methods():
        raise ValueError(f"method must be one of {fullrank.optimizer_methods()}, got {method!r}")
    try:
        re.compile(projected_pattern)
    except re.error as error:
        raise ValueError(f"projected_pattern must be a regular expression, got {projected_pattern!r}: "
                         f"{error}") from None
    common = {"lr": lr, "weight_decay": weight_decay, "betas": None if betas is None else tuple(betas), "eps": eps}
    common = {key: value for key, value in common.items() if value is not None}
    projected = {**common, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, **projected_options}
    projected = {key: value for key, value in projected.items() if value is not None}
    return SubspaceOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=projected_pattern, optimizer_name=method, optimizer_kwargs=projected),
            ParamGroupConfig(pattern=r".*", optimizer_name=method, optimizer_kwargs=common),
        ],
    )
