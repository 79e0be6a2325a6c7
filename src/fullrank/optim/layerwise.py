"""Layer-wise updates (GaLore §4.3): each parameter is stepped, and its gradient freed, during backward.

``register_post_accumulate_grad_hook`` fires once a parameter's gradient is complete, so at most
one full gradient is alive at a time. With ``accumulation_steps = k`` the hook lets the gradient
accumulate over k backward passes and steps on the k-th, so it matches an ordinary loop that calls
``step()`` after k micro-batches (scale the loss by 1/k yourself, as usual).

:class:`LayerwiseOptimizer` is a ``torch.optim.Optimizer`` over one ``SubspaceAdamW`` (any preset):
it shares that optimizer's ``param_groups`` and ``state``, so LR schedulers, ``state_dict``,
``load_state_dict`` and ``zero_grad`` work as usual. Each hook runs
``SubspaceAdamW.step_parameter`` — the ordinary step on a bucket of one matrix, with no host
synchronisation: a non-finite gradient is masked on the device. Call ``step()`` after each
optimizer step's backward passes, as with any optimizer: it reads every parameter's flag of the
step in one transfer, takes the masked parameters' counters (and any refresh) back, and raises
``NonFiniteGradientError`` (``nonfinite="raise"``) or counts a skipped step (``"skip"``). The mode
cannot be atomic: the parameters whose gradients arrived before a non-finite one were updated.

Under DDP the gradients are averaged by the reducer after the hooks would fire, so the mode refuses
a model wrapped in ``DistributedDataParallel``, and for the same reason an FSDP2-sharded one.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from . import host, sharding
from .engine import NonFiniteGradientError, SubspaceAdamW
from .options import check_range

_PASSES_KEY = "layerwise_backward_passes"


class LayerwiseOptimizer(Optimizer):
    """A ``SubspaceAdamW`` stepped per parameter from post-accumulate-grad hooks (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: SubspaceAdamW, accumulation_steps: int = 1):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("layerwise: not supported under DistributedDataParallel (the hooks would see "
                             "un-averaged gradients); train without --layerwise or on one process")
        if any(sharding.is_distributed_tensor(p) for p in model.parameters()):
            raise ValueError("layerwise: not supported on FSDP2-sharded models (a parameter's gradient is "
                             "reduce-scattered after its hook would fire); train without --layerwise")
        if not isinstance(optimizer, SubspaceAdamW):
            raise TypeError(f"layerwise needs a fullrank SubspaceAdamW (any preset; for AdamW use "
                            f"fullrank.SubspaceAdamW on groups without 'rank'), got {type(optimizer).__name__}")
        check_range("accumulation_steps", accumulation_steps, 1, float("inf"), integer=True)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(id(p) not in trainable for p in params):
            raise ValueError("layerwise: groups hold a parameter that is not a trainable parameter of model")
        missing = len(trainable - {id(p) for p in params})
        if missing:
            raise ValueError(f"layerwise: {missing} trainable parameters of model are in no group")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.accumulation_steps = accumulation_steps
        self._backward_passes = {p: 0 for p in params}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict | None]] = []
        self._flagged: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, param: torch.Tensor) -> None:
        self._backward_passes[param] += 1
        if self._backward_passes[param] % self.accumulation_steps:
            return
        finite, before = self.optimizer.step_parameter(param, flagged=id(param) in self._flagged)
        self._pending.append((param, finite, before))
        param.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        """The step's one host synchronisation: read the non-finite flags and the convergence flags
        of every parameter stepped since the last call (the updates happened during backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending, self._pending = self._pending, []
        converged = self._converged_flags()
        flags = [finite for _, finite, _ in pending] + [flag for _, flag in converged]
        read = (host.read(torch.stack([f.reshape(()).to(flags[0].device) for f in flags]),
                          [True] * len(pending) + [False] * len(converged)) if flags else [])
        finite, hits = read[:len(pending)], read[len(pending):]
        self._flagged = {id(p) for (p, _), hit in zip(converged, hits) if hit}
        bad = [(param, before) for (param, _, before), ok in zip(pending, finite) if not ok]
        for param, before in bad:
            self.optimizer.undo_step(param, before)
        if bad:
            names = self._names([p for p, _ in bad])
            if any(self.optimizer.locate(p)[0]["nonfinite"] == "raise" for p, _ in bad):
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or inf) in parameter {names[0]!r}; its update was masked, but in "
                    "layer-wise mode the parameters whose gradients came before it were updated. Use "
                    "nonfinite='skip' to skip such parameters instead.")
            self.optimizer.skipped_steps += 1
        return loss

    def _converged_flags(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from .refresh import converged_flag

        flags = []
        for group in self.param_groups:
            if group.get("rank") is None:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                flag = converged_flag(group, state) if state else None
                if flag is not None:
                    flags.append((p, flag))
        return flags

    def _names(self, params) -> list[str]:
        return [self.optimizer.locate(p)[3] for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed by the hooks; this clears any left from an interrupted accumulation."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def rank_summary(self) -> dict:
        return self.optimizer.rank_summary()

    def current_ranks(self) -> dict[str, int]:
        return self.optimizer.current_ranks()

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        state[_PASSES_KEY] = list(self._backward_passes.values())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        passes = state_dict.pop(_PASSES_KEY, None)
        if "optimizers" in state_dict:  # saved by the per-parameter layer-wise mode of engine v1
            state_dict, passes = _from_per_parameter(state_dict, self.optimizer), state_dict["backward_passes"]
        if passes is not None and len(passes) != len(self._backward_passes):
            raise ValueError(f"layer-wise state holds {len(passes)} parameters, this model has "
                             f"{len(self._backward_passes)} trainable parameters")
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state  # new objects
        for param, count in zip(self._backward_passes, passes or []):
            self._backward_passes[param] = int(count)

    def remove(self) -> None:
        """Unregister the hooks (the model goes back to ordinary backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _from_per_parameter(saved: dict, optimizer: SubspaceAdamW) -> dict:
    """Engine v1's layer-wise state (one optimizer per parameter) as one optimizer's state dict."""
    per_param = saved["optimizers"]
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    if len(per_param) != n:
        raise ValueError(f"layer-wise state holds {len(per_param)} optimizers, this model has {n} trainable parameters")
    current = optimizer.state_dict()
    state = {k: sd["state"][0] for k, sd in enumerate(per_param) if sd["state"]}
    groups, k = [], 0
    for group in current["param_groups"]:
        old = per_param[k]["param_groups"][0] if group["params"] else {}
        keep = {key: value for key, value in old.items() if key not in ("params", "param_ordinal", "param_names")}
        groups.append({**group, **keep, "params": list(range(k, k + len(group["params"])))})
        k += len(group["params"])
    return {"state": state, "param_groups": groups,
            "skipped_steps": max(int(sd.get("skipped_steps", 0)) for sd in per_param)}


def layerwise(
    model: nn.Module,
    make_optimizer: Callable[[list[dict]], SubspaceAdamW],
    groups: list[dict] | None = None,
    accumulation_steps: int = 1,
) -> LayerwiseOptimizer:
    """Step every trainable parameter of ``model`` from its post-accumulate-grad hook.

    Args:
        model: the model whose parameters are trained.
        make_optimizer: builds the optimizer from the param groups, e.g.
            ``lambda g: fullrank.Fira(g, lr=1e-2)`` (a ``SubspaceAdamW`` or preset).
        groups: param groups, e.g. from :func:`fullrank.param_groups`; default one plain group of
            all trainable parameters.
        accumulation_steps: backward passes per optimizer step (gradient accumulation).
    """
    check_range("accumulation_steps", accumulation_steps, 1, float("inf"), integer=True)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return LayerwiseOptimizer(model, make_optimizer(groups), accumulation_steps)
