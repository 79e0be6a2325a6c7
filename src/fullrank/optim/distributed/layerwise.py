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
a model wrapped in ``DistributedDataParallel``.

**FSDP2** (``fully_shard``; GaLore 2's fused step): FSDP2 calls a sharded parameter's
post-accumulate-grad hooks right after its reduce-scatter (``foreach_reduce``), so each parameter is
stepped on this rank's rows as soon as its gradient shard exists, and the set of gradient shards is
never alive at once. The step is ``SubspaceAdamW.step_parameter`` with the collectives of
``base/shards.py`` for one matrix: per parameter and step, one all-reduce of one scalar (‖G‖², the
finiteness flag), one per scalar norm the rule takes and, for a left projection, a reduce-scatter of
r·n and an all-gather of (r+1)·n; at a refresh, a gather of the gradient to rank ``ordinal % w`` and
a broadcast of the new P or Q; ``step()`` adds one all-reduce of one flag per parameter. The collectives are issued from the hooks in hook
order: FSDP2 fires them in the order of its reduce-scatters, the same on every rank (its own
collectives must match), for the parameters it reduce-scatters: those with a gradient — where that
differs between ranks (a parameter used on some ranks only), FSDP2's own reduce-scatters need
``set_reduce_scatter_unused_params(True)``, which reduce-scatters a zero gradient for the others —
so every rank fires the same hooks and issues the same collectives in the same order (a frozen
parameter has no hook). Without a gradient sync (``set_requires_gradient_sync(False)``) FSDP2
reduce-scatters nothing and no hook fires: accumulate micro-batches that way, with
``accumulation_steps=1`` (a larger one is refused on a sharded model, since the hook fires once per
reduce-scatter, not once per backward). Global gradient clipping cannot run layer-wise (it needs
every gradient before the first update).

torch.optim conventions: ``add_param_group`` validates the group through the inner optimizer and
hooks its parameters (unfreeze a layer, set ``requires_grad``, add its group); the state-dict and
load-state-dict hooks registered on the wrapper fire; step pre- and post-hooks run around
``step()``, i.e. after the updates made in backward (a pre-hook sees no gradients). ``copy.deepcopy``
and pickle give a wrapper whose hooks are on the *copied* parameters: copy the model and the
optimizer in one call (``copy.deepcopy((model, opt))``, one ``pickle.dump`` of both) so that the
copy trains the copied model; the original keeps its own hooks.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ..base import closure as closures
from ..base import host
from ..base import shards
from ..base.options import check_range
from ..core.finiteness import NonFiniteGradientError
from ..core.optimizer import SubspaceAdamW
from ..core.plan import parameter_names
from ..units.schedule import converged_flag

_PASSES_KEY = "layerwise_backward_passes"


class LayerwiseOptimizer(Optimizer):
    """A ``SubspaceAdamW`` stepped per parameter from post-accumulate-grad hooks (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: SubspaceAdamW, accumulation_steps: int = 1):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("layerwise: not supported under DistributedDataParallel (the hooks would see "
                             "un-averaged gradients); train without --layerwise or on one process")
        if not isinstance(optimizer, SubspaceAdamW):
            raise TypeError(f"layerwise needs a fullrank SubspaceAdamW (any preset; for AdamW use "
                            f"fullrank.SubspaceAdamW on groups without 'rank'), got {type(optimizer).__name__}")
        check_range("accumulation_steps", accumulation_steps, 1, float("inf"), integer=True)
        if optimizer.param_groups[0]["capturable"]:
            raise ValueError("layerwise: capturable=True is not supported (the layer-wise mode masks each "
                             "parameter's step on the device already); build the optimizer with capturable=False")
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(id(p) not in trainable for p in params):
            raise ValueError("layerwise: groups hold a parameter that is not a trainable parameter of model")
        missing = len(trainable - {id(p) for p in params})
        if missing:
            raise ValueError(f"layerwise: {missing} trainable parameters of model are in no group")
        self.optimizer = optimizer
        self._group = _shard_group(optimizer, params, accumulation_steps)
        self._adopting = True  # Optimizer.__init__ calls add_param_group for the groups the optimizer has already
        super().__init__(optimizer.param_groups, optimizer.defaults)
        del self._adopting
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.accumulation_steps = accumulation_steps
        self._backward_passes = {p: 0 for p in params}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict | None]] = []
        self._flagged: set[int] = set()
        self._hooked = True  # False after remove()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer (which validates it) and hook its parameters, e.g. for
        layers unfrozen during training (each must require grad). A group without ``param_names``
        added to groups that have them gets positional names ``param <k>``."""
        if self.__dict__.get("_adopting"):
            return
        groups = self.optimizer.param_groups
        if isinstance(param_group, dict) and "param_names" not in param_group and any("param_names" in g for g in groups):
            # torch refuses a group without names once the others have them (fullrank.param_groups names them)
            params = param_group.get("params")
            params = [params] if isinstance(params, torch.Tensor) else params
            if isinstance(params, (list, tuple)) and all(isinstance(q, torch.Tensor) for q in params):
                offset = sum(len(g["params"]) for g in groups)
                param_group = {**param_group, "param_names": [f"param {offset + k}" for k in range(len(params))]}
        self.optimizer.add_param_group(param_group)
        params = groups[-1]["params"]
        try:
            names = parameter_names(groups[-1], sum(len(g["params"]) for g in groups[:-1]))
            for param, name in zip(params, names):
                if not param.requires_grad or not param.is_leaf:
                    raise ValueError(f"add_param_group: parameter {name!r} does not require grad (or is not a leaf "
                                     "tensor); a layer-wise step runs from its gradient hook: set requires_grad=True "
                                     "on it before adding its group")
            self._group = _shard_group(self.optimizer, params, self.accumulation_steps, self._group)
        except ValueError:
            groups.pop()
            self.optimizer.forget_caches()
            raise
        for param in params:
            self._backward_passes[param] = 0
            if self._hooked:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    def register_step_pre_hook(self, hook):
        """As ``Optimizer.register_step_pre_hook``, with a warning: in layer-wise mode the hook runs
        when ``step()`` is called, after the updates made in backward, and sees no gradients."""
        warnings.warn("layer-wise: a step pre-hook runs at step(), after every parameter was updated in backward "
                      "(the gradients are freed by then); to act on gradients, use the ordinary step", stacklevel=2)
        return super().register_step_pre_hook(hook)

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickle: the inner optimizer and the wrapper's counters (the hooks
        are registered again on the copied parameters by :meth:`__setstate__`)."""
        return {"defaults": self.defaults, "optimizer": self.optimizer, "accumulation_steps": self.accumulation_steps,
                "backward_passes": list(self._backward_passes.items()), "pending": self._pending,
                "flagged": [p for p in self._backward_passes if id(p) in self._flagged], "hooked": self._hooked}

    def __setstate__(self, state: dict) -> None:
        optimizer = state["optimizer"]
        super().__setstate__({"defaults": state["defaults"], "optimizer": optimizer,
                              "param_groups": optimizer.param_groups, "state": optimizer.state,
                              "accumulation_steps": state["accumulation_steps"]})
        self._backward_passes = dict(state["backward_passes"])
        self._group = _shard_group(optimizer, list(self._backward_passes), self.accumulation_steps)
        self._pending = list(state["pending"])
        self._flagged = {id(p) for p in state["flagged"]}
        self._hooked = state["hooked"]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._backward_passes
                         if self._hooked]

    @torch.compiler.disable
    def _hook(self, param: torch.Tensor) -> None:
        """Step ``param`` once its gradient is complete. Runs eagerly under ``torch.compile`` (Dynamo
        would otherwise trace the hook inside a compiled training step and lose ``param.grad``).

        On an FSDP2 shard FSDP2 calls this from ``foreach_reduce`` right after the reduce-scatter of
        the parameter's unit, for the unit's parameters in order; the units reduce-scatter in the same
        order on every rank (FSDP2's own collectives depend on it), so the collectives the step issues
        here (``base/shards.py``) come in the same order on every rank too. On a GPU the hook runs on
        FSDP2's reduce-scatter stream, which the default stream waits for at the end of backward."""
        if param.grad is None:  # nothing accumulated (a hook fired by another backward's bookkeeping)
            return
        self._backward_passes[param] += 1
        if self._backward_passes[param] % self.accumulation_steps:
            return
        finite, before = self.optimizer.step_parameter(param, flagged=id(param) in self._flagged)
        self._pending.append((param, finite, before))
        param.grad = None

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """The step's one host synchronisation: read the non-finite flags and the convergence flags
        of every parameter stepped since the last call (the updates happened during backward)."""
        loss = closures.evaluate(closure)
        hooked = sum(len(g["params"]) for g in self.param_groups)
        if hooked != len(self._backward_passes):
            raise RuntimeError(f"layer-wise: the groups hold {hooked} parameters but {len(self._backward_passes)} "
                               "have backward hooks; add groups with LayerwiseOptimizer.add_param_group, not "
                               "through the inner optimizer")
        pending, self._pending = self._pending, []
        finite = self._read_flags([finite for _, finite, _ in pending])
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

    def _read_flags(self, finite: list[torch.Tensor]) -> list[bool]:
        """Read the given finiteness flags and every matrix's convergence flag in one transfer (on FSDP2
        shards after one all-reduce, MAX of "non-finite" and of "converged", so that every rank undoes,
        raises, skips and refreshes alike); keeps the converged matrices for the next step's hooks and
        returns the finiteness flags."""
        converged = self._converged_flags()
        flags = [f.logical_not() for f in finite] + [flag for _, flag in converged]
        read = []
        if flags:
            stacked = torch.stack([f.reshape(()).to(flags[0].device) for f in flags])
            if self._group is not None:
                stacked = shards.all_reduce_(stacked.to(torch.int32), self._group, op=dist.ReduceOp.MAX)
            read = host.read(stacked, [False] * len(flags))
        self._flagged = {id(p) for (p, _), hit in zip(converged, read[len(finite):]) if hit}
        return [not bad for bad in read[:len(finite)]]

    def after_load(self) -> None:
        """Read the loaded state's convergence flags (the next step's hooks refresh those matrices, as
        the ordinary step would at its start): called by :meth:`load_state_dict` and the DCP loader."""
        self._read_flags([])

    def _converged_flags(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flags = []
        for group in self.param_groups:
            if group.get("rank") is None:
                continue
            values = self.optimizer.plan(group).values
            for p in group["params"]:
                state = self.state.get(p)
                flag = converged_flag(values, state) if state else None
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
        """The inner optimizer's state dict and the backward-pass counters; the state-dict hooks
        registered on this wrapper fire (those of the inner optimizer too)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.optimizer.state_dict()
        state[_PASSES_KEY] = list(self._backward_passes.values())
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state of :meth:`state_dict` (or of engine v1's layer-wise mode); the load-state-dict
        hooks registered on this wrapper fire."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
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
        self.after_load()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def remove(self) -> None:
        """Unregister the hooks (the model goes back to ordinary backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = False


def _shard_group(optimizer: SubspaceAdamW, params: list, accumulation_steps: int, known=None):
    """The process group of the FSDP2-sharded ``params`` (``known``, or None when none is sharded),
    each checked as the ordinary step would (``shards.row_shard``). Refuses sharded parameters on
    two meshes and ``accumulation_steps > 1`` (see the module doc)."""
    sharded = [p for p in params if shards.is_distributed_tensor(p)]
    for param in sharded:
        name = optimizer.locate(param)[3]
        group = shards.row_shard(param, name).group
        if known is not None and group is not known:
            raise ValueError(f"layerwise: parameter {name!r} is sharded over another process group than the other "
                             "sharded parameters; the layer-wise mode steps the parameters of one FSDP2 mesh")
        known = group
    if sharded and accumulation_steps > 1:
        raise ValueError(f"layerwise: accumulation_steps={accumulation_steps} on an FSDP2-sharded model: FSDP2 fires "
                         "a parameter's hook once per reduce-scatter, not once per backward; use accumulation_steps=1 "
                         "and call model.set_requires_gradient_sync(False) before every micro-batch but the last "
                         "(FSDP2 then reduce-scatters, and the hooks step, once per optimizer step)")
    return known


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
