"""``SubspaceAdamW``: one optimizer for GaLore, Fira, their ablations and the adaptive methods.

A param group with a ``rank`` key is *projected*; its 2-D weights get (paper eq. 2–12)::

    every update_proj_gap steps:  P ← top-r singular vectors of G        (refresh, eq. 2)
    R = Pᵀ·G                                                              (eq. 2)
    ψ(R) = Adam's correction of R, moments kept at r×n                    (inner Adam, eq. 4–5)
    update = P·(a·ψ) + w·c·φ∘(G − κ·P·R)                                  (update rule × limiter, eq. 7–12)
    W ← W·(1 − η·λ) − η·update                                            (decoupled decay)

Every other group is plain AdamW (``plain.py``). This class keeps torch's contract (param groups,
state dict, hooks, ``step``) and delegates the step to its modules: ``finiteness.py`` (the step's one
host read, or its flag kept on the device), ``refresh.py`` (new subspaces), ``buckets.py``,
``compute.py`` (a bucket's pure step: one record in, one out), ``write.py`` (the one writer) and
``step.py`` (the one path that joins them, in its three modes: default, ``capturable=True``,
layer-wise). A group's options are resolved once into its plan (``plan.py``); the units are
``../units/``, each declaring its options and state. The optimizer state holds tensors and plain
numbers only.

**capturable=True** (as torch's capturable AdamW) takes the host read out of the steady step: the
step counters are 0-d device tensors, the finiteness flag masks the whole step on the device, and the
host keeps each matrix's refresh schedule within bounds (``capturable.py``), reading the counters
(and then stepping exactly as by default) only when a refresh may be due. Such a steady step
compiles whole (``torch.compile(opt.step, fullgraph=True)``).

**FSDP2.** Parameters sharded by ``fully_shard`` (DTensors, ``Shard(0)``) are stepped on this
process's rows with the projection of the whole matrix (``base/shards.py``), by :meth:`step` or,
layer-wise, by :meth:`step_parameter` in FSDP2's backward.
"""
from __future__ import annotations

import warnings

import torch
from torch.optim import Optimizer

from ..base import closure as closures
from ..base import shards
from ..base.counters import ADAM_STEP, STEP
from ..units.moments import EXP_AVG, low_shape
from ..units.projection import projection_side
from ..units.rank import current_rank, summarize
from . import finiteness, loaded_state, step
from .buckets import GroupWork, Item, check_dense
from .capturable import CounterSchedule
from .finiteness import NonFiniteGradientError  # noqa: F401 (the step's error, importable from here)
from .group_options import engine_options
from .plain import plain_step
from .plan import GroupPlan, Plans, is_projected, learning_rate, parameter_names
from .stats import ResidualStats


# Where the moments, the step counters and APOLLO's P live: this optimizer's choice, a loaded state is
# converted to it.
KEPT_ON_LOAD = ("states", "capturable", "projection_storage")


class SubspaceAdamW(Optimizer):
    """AdamW in a low-rank gradient subspace, with a rule for the residual outside it.

    Args:
        params: parameters or param groups; groups holding ``rank`` are projected.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, scaled by lr).
        **options: any option of :meth:`option_table` — the engine's own and those every unit
            declares (``base/units.py``). The main ones:

            * ``update_proj_gap`` T, ``scale`` α, ``proj_type`` (GaLore's meaning);
            * ``residual``: the update rule (``units/rules.py``: ``discard``, ``add``, ``scale_matrix``
              (eq. 10), ``scale_column`` (eq. 11), ``only_scaling``, or a registered one) and its
              options (``residual_convention``, ``scaling_granularity``, …);
            * ``limiter`` (``units/limiters.py``: ``norm_growth`` with ``gamma`` γ (eq. 12), ``clip``, …);
            * ``svd`` (``exact``, ``randomized``, ``warm``) and ``projector`` (``svd``, ``random``);
              adaptive rank ``rank_energy``/``min_rank``/``max_rank`` (``units/rank.py``), convergence
              trigger ``refresh_threshold`` (``units/schedule.py``), ``on_switch`` (``units/switch.py``);
            * ``pre_projection`` (``units/transforms.py``: ``none``, ``error_feedback``);
            * ``states`` (``32bit``, ``8bit``: ``units/moments.py``) and ``stochastic_rounding``
              (``units/weights.py``);
            * ``adam_convention`` (``units/adam.py``), ``seed``, ``nonfinite`` (``raise`` or ``skip``
              the step on a NaN/inf gradient, counted in ``skipped_steps``), ``foreach`` (the plain
              groups' ``torch._foreach_*`` kernels), ``bucket_cap_mb``, ``compile``.

    ``maximize=True`` is accepted as ``torch.optim.AdamW`` accepts it (the step ascends).
    """

    @staticmethod
    def option_table() -> dict[str, tuple]:
        """{option: (default, meaning)} of every option a group takes, units' declarations included."""
        return {name: (option.default, option.doc) for name, option in sorted(engine_options().items())}

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options):
        declared = engine_options()
        unknown = sorted(set(options) - set(declared) - {"maximize"})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {', '.join(map(repr, unknown))}; the options "
                            f"are: {', '.join(sorted(declared))}")
        maximize = options.pop("maximize", False)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize must be True or False, got {maximize!r}")
        defaults = {name: option.default for name, option in declared.items()}
        defaults.update(options, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        self._skipped = 0
        self._skipped_on_device: torch.Tensor | None = None
        self._forget()
        self.record_residual_stats = False
        self._residual_stats: ResidualStats | None = None
        if not isinstance(params, torch.Tensor):  # torch fills defaults into the caller's dicts: copy them
            params = [dict(p) if isinstance(p, dict) else p for p in params]
        super().__init__(params, defaults)

    def _forget(self) -> None:
        self._plans = Plans()
        self._schedule = CounterSchedule()
        self._index_of = None

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict) -> None:
        """torch's, validated like the constructor's groups (a bad group is not kept). A group without
        ``param_names`` added to named groups (``fullrank.param_groups`` names them) is named
        ``param <k>``, k its parameters' positions, instead of torch's refusal."""
        named = [g for g in self.param_groups if "param_names" in g]
        if named and len(named) == len(self.param_groups) and isinstance(param_group, dict) \
                and "param_names" not in param_group:
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            offset = sum(len(g["params"]) for g in self.param_groups)
            param_group = {**param_group, "params": params,
                           "param_names": [f"param {offset + k}" for k in range(len(params))]}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.plan(group)
            if group["capturable"] != self.param_groups[0]["capturable"]:
                raise ValueError(f"capturable must be the same in every param group: the new group has "
                                 f"capturable={group['capturable']}, the first {self.param_groups[0]['capturable']}")
        except ValueError:
            self.param_groups.pop()
            raise

    def plan(self, group: dict) -> GroupPlan:
        """The group's plan: its options resolved and validated (rebuilt when one of them changes)."""
        offset = 0
        for other in self.param_groups:
            if other is group:
                break
            offset += len(other["params"])
        return self._plans.of(group, offset)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this or an earlier version of the engine (same per-parameter keys),
        checking every projected state against its parameter and group (``loaded_state.py``).

        Atomic: a state that does not fit (another number of groups or parameters, another model's
        shapes, a rank the group refuses) raises ValueError and leaves this optimizer as it was. As
        in torch, the groups' options come from the checkpoint, except ``states``, ``capturable`` and
        ``projection_storage`` (where the moments, the step counters and APOLLO's P live is this
        optimizer's choice: they are converted); a checkpoint whose rank differs from the configured
        one continues at the checkpoint's rank, with a warning naming both."""
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        state_dict["param_groups"] = [{**self.defaults, **group} for group in state_dict["param_groups"]]  # new options
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        configured = [(group.get("rank"), {key: group[key] for key in KEPT_ON_LOAD}) for group in self.param_groups]
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        self._forget()
        try:
            rank_changes = self._check_loaded(saved_ids, saved_state, configured)
        except Exception:
            self.__setstate__({"state": before[0], "param_groups": before[1]})
            raise
        self.skipped_steps = skipped
        for saved_rank, rank in rank_changes:  # said once the load is accepted, not before a refusal
            warnings.warn(f"load_state_dict: the checkpoint's projected group was saved at rank {saved_rank}, "
                          f"this optimizer was configured with rank {rank}; training continues at rank "
                          f"{saved_rank} (the checkpoint's). Start without the checkpoint's optimizer state "
                          f"to train at rank {rank}.", stacklevel=2)

    def _check_loaded(self, saved_ids: list, saved_state: dict, configured: list) -> list[tuple[int, int]]:
        """Restore the state tensors that keep their own dtype, validate every group and projected state,
        then convert the state to this optimizer's choices (``loaded_state.py``); returns the (saved,
        configured) rank of each projected group whose fixed rank the checkpoint changes."""
        rank_changes = []
        for group, (rank, kept) in zip(self.param_groups, configured):
            group.update(kept)
            if is_projected(group) and rank is not None and group["rank"] != rank and group.get("rank_energy") is None:
                rank_changes.append((group["rank"], rank))
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if loaded_state.keeps_own_dtype(key, value):  # Optimizer.load_state_dict casts to the param's
                    self.state[param][key] = value.to(device=param.device)
        for group in self.param_groups:  # (each group validated)
            self.plan(group)
        for group, _, _, param, name in self.named_parameters():
            plan, state = self.plan(group), self.state.get(param)
            if state and plan.units is not None:
                loaded_state.validate_projected_state(state, param, name, plan, self._row_shard(param, name))
            elif state and EXP_AVG in state and tuple(state[EXP_AVG].shape) != tuple(shards.local(param).shape):
                raise ValueError(f"optimizer state of {name!r}: moments {tuple(state[EXP_AVG].shape)} do not "
                                 f"match the parameter {tuple(param.shape)} (a checkpoint of another model?)")
        for group, _, _, param, name in self.named_parameters():
            if self.state.get(param):
                loaded_state.convert(self.plan(group), self.state[param], param, self._row_shard(param, name))
        return rank_changes

    def forget_caches(self) -> None:
        """Drop what the engine derived from the groups and the state (plans, parameter positions, the
        counters' schedule): call after replacing them from outside (``distributed/checkpoint.py``, or a
        step counter changed by hand: ``capturable=True`` then reads the counters at the next step)."""
        self._forget()

    def __getstate__(self):
        """torch keeps defaults, state and param_groups; the engine's counters come along (deepcopy, pickle)."""
        state = super().__getstate__()
        state.update(_skipped=self._skipped, _skipped_on_device=self.__dict__.get("_skipped_on_device"),
                     record_residual_stats=self.record_residual_stats)
        return state

    def __setstate__(self, state):
        state = dict(state)
        skipped = state.pop("skipped_steps", None)  # (pickles of earlier versions)
        super().__setstate__(state)
        self.__dict__.setdefault("_skipped", 0 if skipped is None else skipped)
        self.__dict__.setdefault("_skipped_on_device", None)
        self.__dict__.setdefault("record_residual_stats", False)
        self._residual_stats = None
        self._forget()
        self.__dict__.pop("_shards", None)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``nonfinite="skip"``). With ``capturable=True`` the
        count of masked steps lives on the device: reading it synchronises."""
        on_device = self._skipped_on_device
        return self._skipped + (0 if on_device is None else int(on_device.item()))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped, self._skipped_on_device = int(value), None

    # ------------------------------------------------------------------ ranks and statistics
    def current_ranks(self) -> dict[str, int]:
        """{parameter name: rank its state is allocated at} for every projected matrix stepped so far."""
        ranks = {}
        for group, _, _, param, name in self.named_parameters():
            state = self.state.get(param)
            if is_projected(group) and state:
                rank = current_rank(low_shape(state), projection_side(group["proj_type"], tuple(param.shape)))
                if rank is not None:
                    ranks[name] = rank
        return ranks

    def named_parameters(self):
        """(group, index in group, ordinal over all groups, parameter, name) of every parameter, in order.
        The ordinal seeds a parameter's random draws; the name is its ``param_names`` entry or ``param <ordinal>``."""
        offset = 0
        for group in self.param_groups:
            for k, (param, name) in enumerate(zip(group["params"], parameter_names(group, offset))):
                yield group, k, offset + k, param, name
            offset += len(group["params"])

    def rank_summary(self) -> dict:
        """``dict(min=, median=, max=, mean=, ranks={name: r})`` over the projected matrices, read from
        the state's shapes (no device synchronisation). The statistics are None before the first step."""
        return summarize(self.current_ranks())

    def residual_stats(self) -> dict | None:
        """Of the last step, over the projected matrices with a residual: ``residual_norm`` (‖S‖ before
        the limiter, root of the sum of squares), ``limited_norm`` (after it) and ``limited_fraction``
        (share of matrices the limiter scaled down), as 0-d tensors on the device (reading them
        synchronises; the step does not). None unless ``record_residual_stats`` is set and a step
        with a residual has run."""
        return None if self._residual_stats is None else self._residual_stats.summary()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if one is given."""
        loss = closures.evaluate(closure)
        work = self._gather()
        if not self.param_groups[0]["capturable"]:
            self._step_read_on_host(work)
        elif self._schedule.steady(work, self.state):
            self._step_on_device(work)
        else:
            try:
                with self._schedule.counters_on_host(work, self.state):
                    self._step_read_on_host(work)
            finally:
                items = [item for part in work for item in part.items]
                if self._skipped_on_device is None and items:  # (made here: a compiled steady step only adds to it)
                    self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=items[0].weight.device)
        return loss

    def _step_read_on_host(self, work: list[GroupWork]) -> None:
        """The step with its one host read (finiteness, convergence flags): refreshes, raises or skips."""
        guard = finiteness.read_on_host(work, self.state)
        if guard is None:
            self.skipped_steps += 1
            return
        self._residual_stats = ResidualStats() if self.record_residual_stats else None
        step.run(work, self.state, guard, self._residual_stats)

    def _step_on_device(self, work: list[GroupWork]) -> None:
        """``capturable=True``'s steady step: no host read; the finiteness flag masks the whole step
        (nothing changes when a gradient is non-finite, and the step is not counted)."""
        guard = finiteness.keep_on_device(work)
        self._skipped_on_device.add_(guard.keep.logical_not().to(self._skipped_on_device.device))
        self._residual_stats = ResidualStats() if self.record_residual_stats else None
        step.run(work, self.state, guard, self._residual_stats)
        self._schedule.stepped(work)

    def _gather(self) -> list[GroupWork]:
        """The items of every parameter that has a gradient, per group with its plan. The ordinal
        (which seeds random draws) is the parameter's position over all groups."""
        work = {id(group): GroupWork(group, self.plan(group), []) for group in self.param_groups}
        for group, k, ordinal, param, name in self.named_parameters():
            if param.grad is None:
                continue
            check_dense(param.grad, name)
            part = work[id(group)]
            part.items.append(self._item(part.plan, (ordinal, k), param, name))
        return list(work.values())

    def _item(self, plan: GroupPlan, position: tuple[int, int], param: torch.Tensor, name: str) -> Item:
        """The step's item of ``param`` at (ordinal, index in group) with its gradient (negated under
        ``maximize``, torch's convention): this rank's rows of both on an FSDP2 shard."""
        grad = param.grad.neg() if plan.values.maximize else param.grad
        shard = self._row_shard(param, name)
        if shard is None:
            return Item(*position, param, grad, name)
        return Item(*position, param, shards.local(grad), name, shards.local(param), shard)

    def _row_shard(self, param: torch.Tensor, name: str) -> shards.RowShard | None:
        """The parameter's FSDP2 row shard (cached), or None for a plain tensor."""
        if not shards.is_distributed_tensor(param):
            return None
        cache = self.__dict__.setdefault("_shards", {})
        if id(param) not in cache:
            cache[id(param)] = shards.row_shard(param, name)
        return cache[id(param)]

    # ------------------------------------------------------------------ layer-wise
    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor, flagged: bool = False) -> tuple[torch.Tensor, dict | None]:
        """Step one parameter with its current gradient, without a host synchronisation (the
        layer-wise mode, ``distributed/layerwise.py``): the one step path for one bucket of one
        parameter (on an FSDP2 shard: this rank's rows, with the bucket's collectives). A non-finite
        gradient is caught on the device: the parameter and its state are left as they were
        (``torch.where``), and the returned 0-d bool ``finite`` tells the caller, who reads every
        parameter's flag in one transfer and then calls :meth:`undo_step` for the non-finite ones.
        Returns (finite, the state before a refresh made at this step, or None)."""
        group, index, ordinal, name = self.locate(param)
        check_dense(param.grad, name)
        plan = self.plan(group)
        item = self._item(plan, (ordinal, index), param, name)
        item.grad, guard = finiteness.one_parameter(param, item.grad, flagged, item.shard)
        part = GroupWork(group, plan, [item])
        if part.plan.units is None:
            plain_step(part.plan, part.items, self.state, learning_rate(group), guard.keep)
            return guard.keep, None
        before = dict(self.state[param])
        refreshed = step.step_projected(part, self.state, guard, self._residual_stats)
        return guard.keep, (before if refreshed else None)

    def undo_step(self, param: torch.Tensor, before_refresh: dict | None) -> None:
        """Take back the counters (and a refresh) of a step that :meth:`step_parameter` masked."""
        state = self.state[param]
        if before_refresh is not None:
            state.clear()
            state.update(before_refresh)
            return
        state[STEP] -= 1
        if ADAM_STEP in state:
            state[ADAM_STEP] -= 1

    def locate(self, param: torch.Tensor) -> tuple[dict, int, int, str]:
        """(group, index in group, ordinal over all groups, name) of a parameter."""
        index_of = self._index_of
        if index_of is None or id(param) not in index_of:
            index_of = {id(p): (group, k, ordinal, name) for group, k, ordinal, p, name in self.named_parameters()}
            self._index_of = index_of
            if id(param) not in index_of:
                raise ValueError("step_parameter: the parameter is in none of this optimizer's groups")
        return index_of[id(param)]
