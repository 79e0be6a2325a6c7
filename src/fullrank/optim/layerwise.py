"""Layer-wise updates (GaLore §4.3): each parameter is stepped, and its gradient freed, during backward.

``register_post_accumulate_grad_hook`` fires once a parameter's gradient is complete, so at most
one full gradient is alive at a time. With ``accumulation_steps = k`` the hook lets the gradient
accumulate over k backward passes and steps on the k-th, so it matches an ordinary loop that calls
``step()`` after k micro-batches (scale the loss by 1/k yourself, as usual).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .options import check_range
from .rank import summarize


class LayerwiseOptimizer:
    """Handle returned by :func:`layerwise`: per-parameter optimizers and their hooks.

    ``param_groups`` lists every per-parameter group, so a learning-rate schedule can set
    ``group["lr"]`` on all of them; ``state_dict``/``load_state_dict`` round-trip all optimizers.
    """

    def __init__(self, optimizers: dict[nn.Parameter, torch.optim.Optimizer], accumulation_steps: int):
        self.optimizers = optimizers
        self.accumulation_steps = accumulation_steps
        self._backward_passes = {p: 0 for p in optimizers}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in optimizers]

    def _hook(self, param: torch.Tensor) -> None:
        self._backward_passes[param] += 1
        if self._backward_passes[param] % self.accumulation_steps:
            return
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def rank_summary(self) -> dict:
        """``dict(min=, median=, max=, mean=, ranks={name: r})`` over the projected parameters, as
        ``SubspaceAdamW.rank_summary`` (names from ``param_names``, else ``param <k>`` in hook order)."""
        ranks = {}
        for k, opt in enumerate(self.optimizers.values()):
            current = getattr(opt, "current_ranks", None)
            if current is None:
                continue
            named = opt.param_groups[0].get("param_names") is not None
            for name, rank in current().items():
                ranks[name if named else f"param {k}"] = rank
        return summarize(ranks)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed by the hooks; this clears any left from an interrupted accumulation."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers.values()],
            "backward_passes": [self._backward_passes[p] for p in self.optimizers],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"layer-wise state holds {len(saved)} optimizers, this model has {len(self.optimizers)} trainable parameters"
            )
        for opt, opt_state in zip(self.optimizers.values(), saved):
            opt.load_state_dict(opt_state)
        for param, count in zip(self.optimizers, state_dict["backward_passes"]):
            self._backward_passes[param] = int(count)

    def remove(self) -> None:
        """Unregister the hooks (the model goes back to ordinary backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def layerwise(
    model: nn.Module,
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    groups: list[dict] | None = None,
    accumulation_steps: int = 1,
) -> LayerwiseOptimizer:
    """Give every trainable parameter its own optimizer, stepped from a post-accumulate-grad hook.

    Args:
        model: the model whose parameters are trained.
        make_optimizer: called once per parameter with a one-parameter list of param groups
            (a copy of that parameter's group from ``groups``, with ``param_ordinal``, its position in
            ``groups``, so that seeded random draws match one optimizer over all of them), e.g.
            ``lambda g: fullrank.Fira(g, lr=1e-2)``.
        groups: param groups, e.g. from :func:`fullrank.param_groups`; default one group of all
            trainable parameters.
        accumulation_steps: backward passes per optimizer step (gradient accumulation).
    """
    check_range("accumulation_steps", accumulation_steps, 1, float("inf"), integer=True)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimizers: dict[nn.Parameter, torch.optim.Optimizer] = {}
    ordinal = 0
    for group in groups:
        names = group.get("param_names")
        for k, param in enumerate(group["params"]):
            if id(param) not in trainable:
                raise ValueError("layerwise: groups hold a parameter that is not a trainable parameter of model")
            single = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            single["params"] = [param]
            single["param_ordinal"] = ordinal  # seeds random draws as one optimizer over ``groups`` would
            ordinal += 1
            if names is not None:
                single["param_names"] = [names[k]]
            optimizers[param] = make_optimizer([single])
    missing = trainable - {id(p) for p in optimizers}
    if missing:
        raise ValueError(f"layerwise: {len(missing)} trainable parameters of model are in no group")
    return LayerwiseOptimizer(optimizers, accumulation_steps)
