"""``SubspaceAdamW``: one optimizer for GaLore, Fira, their ablations and the adaptive methods.

A param group with a ``rank`` key is *projected*; its 2-D weights get (paper eq. 2–12)::

    every update_proj_gap steps:  P ← top-r singular vectors of G        (subspace policy, eq. 2)
    R = Pᵀ·G                                                              (eq. 2)
    ψ(R) = Adam's correction of R, moments kept at r×n                    (inner Adam, eq. 4–5)
    update = P·(a·ψ) + w·c·φ∘(G − κ·P·R)                                  (update rule × limiter, eq. 7–12)
    W ← W·(1 − η·λ) − η·update                                            (decoupled decay)

Every other group is plain AdamW: torch's own fused kernel (``torch.optim.adamw.adamw(fused=True)``)
where its convention applies, else ``torch._foreach_*`` kernels per device and dtype, like
``torch/optim/adamw.py``.

**Work per bucket, not per matrix.** The projected matrices of a group that share device, dtype,
shape, projection side and rank form a bucket (LLaMA has three weight shapes: ~3 buckets per group);
each step stacks a bucket's gradients and states and runs the projection (``bmm``), Adam, the
norms, φ, the limiter (on a vector of norms) and the update as batched operations, then writes the
parameters with one ``_foreach_add_``. The number of operations per step is set by the number of
buckets, not by depth. Buckets are capped at ``bucket_cap_mb`` of stacked gradient: the transient
memory of a step is at most that cap (or one matrix, if larger) for the gradient stack plus the
bucket's low-rank temporaries (R, ψ, moments: ≈ 3·r/min(m, n) of it), e.g. 256 MiB against the
13 GiB of bf16 gradients of LLaMA-7B (2%). On the CPU the default bucket is one matrix: there the
step is bound by memory traffic, not launches, and a one-matrix bucket is a view of its gradient whose
update goes straight into the weight (one ``addmm_`` and one ``addcmul_``, two passes over W). The optimizer state stays per parameter, exactly
2·r·max(m, n) + r·min(m, n) elements per matrix (``state.py`` owns the schema).

The parts are units with one owner each, each declaring its options and state (``components.py``):
``residual.py`` (update rules), ``limiter.py`` (limiters), ``moments.py`` (where Adam's moments live:
32-bit, 8-bit), ``transforms.py`` (what acts on G before projection), ``inner_adam.py`` (Adam),
``subspace.py`` (when and how P is recomputed: ``svd.py``'s backends, ``projectors.py``, adaptive rank,
staggering, moment carry-over), ``update.py`` (the update's assembly and its writers), ``weights.py``
(stochastic rounding), ``state.py`` (state keys and their checks), ``options.py`` (the merged options
and their validation). The engine has no branch per rule, limiter, store or transform.

**FSDP2.** Parameters sharded by ``fully_shard`` (DTensors, ``Shard(0)``) are stepped on this
process's rows with the projection of the whole matrix: ``sharding.py`` owns the collectives (a
right projection is local, a left one reduce-scatters R by columns, norms are all-reduced, a refresh
is computed whole by one owner per matrix) and ``sharded_state.py`` the DCP checkpoint layout.

The step is atomic with respect to non-finite gradients: every gradient's norm is taken first
(one ``_foreach_norm`` per device) and read in the step's one host synchronisation, together with
the convergence flags of ``refresh.py``; a step where adaptive ranks are recomputed reads them in
one more. The optimizer state holds tensors and plain numbers only.

**capturable=True** (as torch's capturable AdamW) takes that read out of the steady step: the step
counters are 0-d device tensors, the finiteness flag masks the whole step on the device, and the host
keeps each matrix's refresh schedule within bounds, reading the counters (and then stepping exactly as
above) only when a refresh may be due. Such a steady step compiles whole (``torch.compile(opt.step,
fullgraph=True)``).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from . import host, inner_adam, moments, sharding, subspace, weights
from . import state as S
from .limiter import Limiter, get_limiter
from .options import engine_options, unit_state_keys, validate_common, validate_projected
from .projector import project, projection_side
from .random_proj import stores_seed_only
from .rank import current_rank, is_adaptive, summarize
from .refresh import record_energy_, refresh_possible, stacked_energy, stagger_offset, uses_trigger
from .residual import Rule, get_rule, norm_dtype
from .transforms import TRANSFORM_REGISTRY, Transform
from .update import AdamOptions, bucket_update_

MIB = 2**20
# bucket_cap_mb=None: one matrix per bucket on the CPU (launches are cheap there and memory traffic is
# what costs: a one-matrix bucket is a view of its gradient, written straight into the weight), this
# many MiB of stacked gradient elsewhere (a GPU's step is bound by launches).
DEFAULT_BUCKET_CAP_MB = 256.0


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or ±inf; nothing was updated."""


def is_projected(group: dict) -> bool:
    """A group is projected when it carries a rank, as in GaLore's param groups."""
    return group.get("rank") is not None


def parameter_names(group: dict, offset: int = 0) -> list[str]:
    """The group's ``param_names`` or positional names ``param <k>``."""
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"param {offset + k}" for k in range(len(group["params"]))]


# The group options a plan is built from; with the options its rule and limiter declare (and α), which
# it fixes, so that a compiled bucket step treats them as constants.
_PLAN_KEYS = ("residual", "limiter", "refresh_threshold", "projector", "pre_projection", "compile", "betas", "eps",
              "weight_decay", "adam_convention")


@dataclass(frozen=True)
class GroupPlan:
    """A projected group's options resolved once into its units (rebuilt if an option changes)."""

    rule: Rule
    limiter: Limiter
    trigger: bool  # convergence-triggered refresh (τ > 0)
    seed_only: bool  # APOLLO: P regenerated from a stored seed
    transform: Transform  # the pre-projection transform
    options: dict  # α and the options the rule and the limiter declare
    adam: AdamOptions
    compiled: dict  # (side, compile) → bucket_update_, compiled on first use when asked

    def bucket_update(self, side: str, compile: bool):
        """:func:`update.bucket_update_` with this plan's units bound, compiled (``fullgraph=True``)
        when ``compile``."""
        key = (side, compile)
        if key not in self.compiled:
            fn = functools.partial(bucket_update_, self.rule, self.limiter, self.options, side, self.adam)
            self.compiled[key] = _compiled_per_bucket(fn) if compile else fn
        return self.compiled[key]


# Graphs one compiled bucket step may hold: one per bucket signature (shapes, bucket size, dtype). Every
# bucket shares the code of ``bucket_update_``, whose graphs Dynamo counts together, and its default
# limit (8) is below the bucket signatures of a large model.
BUCKET_GRAPHS = 256


def _compiled_per_bucket(fn):
    """``torch.compile(fn, fullgraph=True, dynamic=False)``, allowed a graph per bucket signature."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # inside the caller's own torch.compile(opt.step): inlined
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=BUCKET_GRAPHS):
            return compiled(*args, **kwargs)
    return run


@dataclass
class Item:
    """One parameter with a gradient this step."""

    ordinal: int  # position over all groups (seeds random draws)
    index: int  # position in its group (refresh staggering)
    param: torch.Tensor  # the state's key (an FSDP2 DTensor, or the tensor itself)
    grad: torch.Tensor  # this rank's part of the gradient
    name: str
    weight: torch.Tensor | None = None  # this rank's part of the parameter, written in place
    shard: sharding.RowShard | None = None  # where that part lies (FSDP2), None: the whole tensor

    def __post_init__(self):
        if self.weight is None:
            self.weight = self.param

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def _check_dense(grad: torch.Tensor, name: str) -> None:
    if grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient; SubspaceAdamW needs dense gradients")


def _advance_counters(states: list[dict], keys: tuple[str, ...], keep: torch.Tensor | None) -> None:
    """Count a step: +1 on int counters; on 0-d device counters (``capturable=True``) +keep, so that a
    skipped step is not counted."""
    for key in keys:
        counters = [s[key] for s in states]
        if isinstance(counters[0], torch.Tensor):
            torch._foreach_add_(counters, [keep.to(counters[0].dtype)] * len(counters))
        else:
            for state in states:
                state[key] += 1


def _as_device_scalars(steps: list, lr, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step counts and η as 0-d fp32 tensors on ``device`` (a compiled step sees them as inputs, not
    constants: it is not recompiled when they change)."""
    if not inner_adam.on_device(steps):
        steps = list(inner_adam.host_values(steps, device).unbind(0))
    if not isinstance(lr, torch.Tensor):
        lr = inner_adam.host_values([lr], device)[0]
    return steps, lr


def _fused_step_counts(states: list[dict], device: torch.device) -> list[torch.Tensor]:
    """The int step counts (already advanced) as the 0-d fp32 tensors torch's fused AdamW advances
    itself, so one less (``inner_adam.host_values``: no host synchronisation)."""
    return list(inner_adam.host_values([s[S.STEP] - 1 for s in states], device).unbind(0))


def _by_device_and_dtype(items: list[Item]) -> list[tuple[torch.device, list[Item]]]:
    """(device, items) per device and dtype of the weights: the plain groups' kernel buckets."""
    kinds: dict[tuple, list[Item]] = {}
    for item in items:
        kinds.setdefault((item.weight.device, item.weight.dtype), []).append(item)
    return [(device, members) for (device, _), members in kinds.items()]


def learning_rate(group: dict) -> float:
    """The group's η as a float (a 0-d tensor ``lr``, as torch optimizers accept, is read here)."""
    lr = group["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def _refuse_on_shards(group: dict, items: list[Item]) -> None:
    """8-bit moments, stochastic rounding and pre-projection transforms are refused on FSDP2 shards
    (with the option named)."""
    if any(item.shard is not None for item in items):
        if group["capturable"]:
            raise ValueError(f"capturable=True is not supported on FSDP2-sharded parameters ({items[0].name!r}); "
                             "train with capturable=False under --fsdp")
        if is_projected(group) and group["pre_projection"] != "none":
            raise ValueError(f"pre_projection={group['pre_projection']!r} is not supported on FSDP2-sharded "
                             f"parameters ({items[0].name!r}); train without --fsdp")
        if group["states"] != "32bit":
            raise ValueError(f"states={group['states']!r} is not supported on FSDP2-sharded parameters "
                             f"({items[0].name!r}); use states='32bit' with --fsdp")
        if group["stochastic_rounding"]:
            raise ValueError(f"stochastic_rounding=True is not supported on FSDP2-sharded parameters "
                             f"({items[0].name!r}); FSDP2's MixedPrecisionPolicy keeps fp32 weights")


class SubspaceAdamW(Optimizer):
    """AdamW in a low-rank gradient subspace, with a rule for the residual outside it.

    Args:
        params: parameters or param groups; groups holding ``rank`` are projected.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, scaled by lr).
        **options: any option of :meth:`option_table` — the engine's own and those every unit
            declares (``components.py``). The main ones:

            * ``update_proj_gap`` T, ``scale`` α, ``proj_type`` (GaLore's meaning);
            * ``residual``: the update rule (``residual.py``: ``discard``, ``add``, ``scale_matrix``
              (eq. 10), ``scale_column`` (eq. 11), ``only_scaling``, or a registered one) and its
              options (``residual_convention``, ``scaling_granularity``, …);
            * ``limiter`` (``limiter.py``: ``norm_growth`` with ``gamma`` γ (eq. 12), ``clip``, …);
            * ``svd`` (``exact``, ``randomized``, ``warm``) and ``projector`` (``svd``, ``random``);
              adaptive rank ``rank_energy``/``min_rank``/``max_rank`` (``rank.py``), convergence
              trigger ``refresh_threshold`` (``refresh.py``), ``on_switch`` (``switch.py``);
            * ``pre_projection`` (``transforms.py``: ``none``, ``error_feedback``);
            * ``states`` (``32bit``, ``8bit``: ``moments.py``) and ``stochastic_rounding``
              (``weights.py``);
            * ``adam_convention`` (``inner_adam.py``), ``seed``, ``nonfinite`` (``raise`` or ``skip``
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
        self._schedule: dict[int, list[int]] = {}
        self.record_residual_stats = False
        self._residual_stats: dict | None = None
        self._plans: dict[int, tuple[tuple, GroupPlan]] = {}
        if not isinstance(params, torch.Tensor):  # torch fills defaults into the caller's dicts: copy them
            params = [dict(p) if isinstance(p, dict) else p for p in params]
        super().__init__(params, defaults)

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
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            self._validate_group(group, offset)
            if group["capturable"] != self.param_groups[0]["capturable"]:
                raise ValueError(f"capturable must be the same in every param group: the new group has "
                                 f"capturable={group['capturable']}, the first {self.param_groups[0]['capturable']}")
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _validate_group(group: dict, offset: int) -> None:
        validate_common(group)
        if is_projected(group):
            validate_projected(group, parameter_names(group, offset))

    def _plan(self, group: dict) -> GroupPlan:
        """The group's frozen plan, rebuilt (and re-validated) only when one of its options changed."""
        rule, limiter = get_rule(group["residual"]), get_limiter(group["limiter"])
        options = {"scale": group["scale"], **{k: group[k] for k in (*rule.options, *limiter.options)}}
        signature = (*(group[k] for k in _PLAN_KEYS), tuple(options.items()))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == signature:
            return cached[1]
        plan = GroupPlan(rule=rule, limiter=limiter, trigger=uses_trigger(group), seed_only=stores_seed_only(group),
                         transform=TRANSFORM_REGISTRY.get(group["pre_projection"]), options=options,
                         adam=AdamOptions.of(group), compiled={})
        self._plans[id(group)] = (signature, plan)
        return plan

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this or an earlier version of the engine (same per-parameter keys),
        checking every projected state against its parameter and group (``state.py``).

        Atomic: a state that does not fit (another number of groups or parameters, another model's
        shapes, a rank the group refuses) raises ValueError and leaves this optimizer as it was. As
        in torch, the groups' options come from the checkpoint, except ``states`` and ``capturable``
        (where the moments and the step counters live is this optimizer's choice: they are
        converted); a checkpoint whose rank
        differs from the configured one continues at the checkpoint's rank, with a warning naming both."""
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        state_dict["param_groups"] = [{**self.defaults, **group} for group in state_dict["param_groups"]]  # new options
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        configured = [(group.get("rank"), group["states"], group["capturable"]) for group in self.param_groups]
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        try:
            self._check_loaded(saved_ids, saved_state, configured)
        except Exception:
            self.__setstate__({"state": before[0], "param_groups": before[1]})
            raise
        self.skipped_steps = skipped
        self._plans.clear()
        self._index_of = None
        self._schedule = {}

    def _check_loaded(self, saved_ids: list, saved_state: dict, configured: list) -> None:
        """Restore the state tensors that keep their own dtype, validate every group and projected state,
        then convert the moments to this optimizer's ``states``."""
        for group, (rank, states, capturable) in zip(self.param_groups, configured):
            group["states"], group["capturable"] = states, capturable
            if is_projected(group) and rank is not None and group["rank"] != rank and not is_adaptive(group):
                warnings.warn(f"load_state_dict: the checkpoint's projected group was saved at rank {group['rank']}, "
                              f"this optimizer was configured with rank {rank}; training continues at rank "
                              f"{group['rank']} (the checkpoint's). Start without the checkpoint's optimizer state "
                              f"to train at rank {rank}.", stacklevel=3)
        params = [p for g in self.param_groups for p in g["params"]]
        own_keys = unit_state_keys()
        for saved_id, param in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if S.keeps_own_dtype(key, value) or key in own_keys:  # Optimizer.load_state_dict casts to the param's
                    self.state[param][key] = value.to(device=param.device)
        offset = 0
        for group in self.param_groups:
            self._validate_group(group, offset)
            offset += len(group["params"])
        for group, _, _, param, name in self.named_parameters():
            state = self.state.get(param)
            if state and is_projected(group):
                S.validate_projected_state(state, param, name, group, self._row_shard(param, name))
            elif state and S.EXP_AVG in state and tuple(state[S.EXP_AVG].shape) != tuple(sharding.local(param).shape):
                raise ValueError(f"optimizer state of {name!r}: moments {tuple(state[S.EXP_AVG].shape)} do not "
                                 f"match the parameter {tuple(param.shape)} (a checkpoint of another model?)")
        for group in self.param_groups:
            store = moments.get_store(group["states"])
            for param in group["params"]:
                state = self.state.get(param)
                if state:
                    store.adopt(state, param)
                    for key in S.COUNTER_KEYS:  # ints, or device tensors under capturable=True
                        value = state.get(key)
                        if isinstance(value, torch.Tensor) and not group["capturable"]:
                            state[key] = int(value.item())
                        elif value is not None and group["capturable"]:
                            state[key] = torch.as_tensor(value, dtype=torch.float32).to(sharding.local(param).device)

    def forget_caches(self) -> None:
        """Drop what the engine derived from the groups and the state (plans, parameter positions):
        call after replacing them from outside (``sharded_state.load_distributed_state_dict``, or a
        step counter changed by hand: ``capturable=True`` then reads the counters at the next step)."""
        self._plans.clear()
        self._index_of = None
        self._schedule = {}

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
        self._plans = {}
        self._index_of = None
        self._schedule = {}
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
                rank = current_rank(moments.low_shape(state), projection_side(group["proj_type"], tuple(param.shape)))
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
        stats = self._residual_stats
        if not stats or stats["count"] == 0:
            return None
        return dict(residual_norm=stats["pre_sq"].sqrt(), limited_norm=stats["post_sq"].sqrt(),
                    limited_fraction=stats["limited"] / stats["count"])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        if not self.param_groups[0]["capturable"]:
            self._synchronized_step(work)
        elif self._steady(work):
            self._capturable_step(work)
        else:
            with self._counters_on_host(work):
                self._synchronized_step(work)
        return loss

    def _synchronized_step(self, work) -> None:
        """The step with its one host read (finiteness, convergence flags): refreshes, raises or skips."""
        finite, flagged, grad_norms = self._synchronize(work)
        if not finite:
            self.skipped_steps += 1
            return
        self._residual_stats = {"count": 0} if self.record_residual_stats else None
        for group, items in work:
            if not items:
                continue
            if is_projected(group):
                self._projected_step(group, items, flagged, grad_norms)
            else:
                self._plain_step(group, items)

    # ------------------------------------------------------------------ capturable=True
    def _steady(self, work) -> bool:
        """Whether no parameter of this step can need the host: every one has been stepped since the
        last synchronised step, and no refresh can be due at any step count its matrix may have
        reached (the host knows the count only within [known, known + calls])."""
        if not any(items for _, items in work):
            return False
        for group, items in work:
            for item in items:
                known = self._schedule.get(id(item.param))
                if known is None:
                    return False
                if is_projected(group) and refresh_possible(group, self.state[item.param], known[0], sum(known),
                                                            stagger_offset(group, item.index)):
                    return False
        return True

    @contextlib.contextmanager
    def _counters_on_host(self, work):
        """Around a synchronised step of ``capturable=True``: the device counters of the step's
        parameters read as ints (one transfer per device), written back in place afterwards."""
        states = [(item, self.state[item.param]) for _, items in work for item in items]
        held, by_device = {}, {}
        for _, state in states:
            for key in S.COUNTER_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    held[id(state), key] = value
                    by_device.setdefault(value.device, []).append((state, key, value))
        for entries in by_device.values():
            values = host.read(torch.stack([value for *_, value in entries]), [0] * len(entries))
            for (state, key, _), value in zip(entries, values):
                state[key] = int(value)
        try:
            yield
        finally:
            for item, state in states:
                if isinstance(state.get(S.STEP), int):
                    self._schedule[id(item.param)] = [state[S.STEP], 0]
                for key in S.COUNTER_KEYS:
                    value = state.get(key)
                    if value is None or isinstance(value, torch.Tensor):
                        continue
                    counter = held.get((id(state), key))
                    if counter is None:
                        counter = torch.zeros((), dtype=torch.float32, device=item.weight.device)
                    state[key] = counter.fill_(value)
            if self._skipped_on_device is None and states:  # (made here: a compiled steady step only adds to it)
                self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=states[0][0].weight.device)

    def _capturable_step(self, work) -> None:
        """A steady step without a host read: the finiteness flag stays on the device and masks the
        whole step (nothing changes when a gradient is non-finite, and the step is not counted)."""
        keep, grad_norms = self._finite_on_device(work)
        self._skipped_on_device.add_(keep.logical_not().to(self._skipped_on_device.device))
        self._residual_stats = {"count": 0} if self.record_residual_stats else None
        for group, items in work:
            if not items:
                continue
            if is_projected(group):
                self._projected_step(group, items, set(), grad_norms, keep=keep, refresh=False)
            else:
                self._plain_fused(group, items, keep)
            for item in items:
                self._schedule[id(item.param)][1] += 1

    def _finite_on_device(self, work) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(every gradient finite, as a 0-d bool on the first gradient's device; ‖G‖ per parameter id,
        0 where the step is masked): one ``_foreach_norm`` per device, nothing read."""
        by_device: dict[torch.device, list[Item]] = {}
        for _, items in work:
            for item in items:
                by_device.setdefault(item.grad.device, []).append(item)
        norms = {device: torch.stack(torch._foreach_norm([i.grad for i in items], 2))
                 for device, items in by_device.items()}
        flags = [torch.isfinite(n).all() for n in norms.values()]
        keep = flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()
        grad_norms = {}
        for device, items in by_device.items():
            here = keep if keep.device == device else keep.to(device, non_blocking=True)
            grad_norms.update(zip((id(i.param) for i in items), torch.where(here, norms[device], 0).unbind(0)))
        return keep, grad_norms

    def _plain_fused(self, group: dict, items: list[Item], keep: torch.Tensor) -> None:
        """The plain groups under ``capturable=True``, masked by ``keep``: torch's functional AdamW,
        fused, with ``found_inf`` (eager); under ``torch.compile`` (which does not trace the fused
        kernel) :func:`inner_adam.adamw_` masked, the gradients zeroed in the graph."""
        beta1, beta2 = group["betas"]
        for device, members in _by_device_and_dtype(items):
            states = [self.state[i.param] for i in members]
            params, grads = [i.weight for i in members], [i.grad for i in members]
            exp_avgs, exp_avg_sqs = [s[S.EXP_AVG] for s in states], [s[S.EXP_AVG_SQ] for s in states]
            steps = [s[S.STEP] for s in states]
            here = keep if keep.device == device else keep.to(device, non_blocking=True)
            if torch.compiler.is_compiling():
                _advance_counters(states, (S.STEP,), here)  # (in place: ``steps`` holds the new counts)
                inner_adam.adamw_(params, [torch.where(here, g, 0) for g in grads], exp_avgs, exp_avg_sqs,
                                  steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                                  eps=group["eps"], weight_decay=group["weight_decay"], foreach=True, keep=here)
                continue
            inner_adam.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                    found_inf=here.logical_not().to(torch.float32))

    def _gather(self) -> list[tuple[dict, list[Item]]]:
        """(group, items) for every parameter that has a gradient. The ordinal (which seeds random
        draws) is the parameter's position over all groups."""
        work = {id(group): (group, []) for group in self.param_groups}
        for group, k, ordinal, param, name in self.named_parameters():
            if param.grad is None:
                continue
            _check_dense(param.grad, name)
            shard = self._row_shard(param, name)
            grad = param.grad.neg() if group["maximize"] else param.grad  # (torch's convention)
            if shard is None:
                work[id(group)][1].append(Item(ordinal, k, param, grad, name))
            else:
                work[id(group)][1].append(Item(ordinal, k, param, sharding.local(grad), name, sharding.local(param), shard))
        return list(work.values())

    def _row_shard(self, param: torch.Tensor, name: str) -> sharding.RowShard | None:
        """The parameter's FSDP2 row shard (cached), or None for a plain tensor."""
        if not sharding.is_distributed_tensor(param):
            return None
        shards = self.__dict__.setdefault("_shards", {})
        if id(param) not in shards:
            shards[id(param)] = sharding.row_shard(param, name)
        return shards[id(param)]

    def _synchronize(self, work) -> tuple[bool, set[int], dict[int, torch.Tensor]]:
        """Whether every gradient is finite, the ids of the parameters whose subspace asked for a
        refresh (``refresh.py``), read in one transfer per device before anything is written, and
        each gradient's 2-norm on its device (by parameter id), which the step reuses."""
        grads: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        energies: dict[torch.device, list[tuple[int, torch.Tensor, float]]] = {}
        for group, items in work:
            trigger = is_projected(group) and uses_trigger(group)
            for item in items:
                grads.setdefault(item.grad.device, []).append((id(item.param), item.grad))
                energy = self.state.get(item.param, {}).get(S.CAPTURED_ENERGY) if trigger else None
                if energy is not None:
                    energies.setdefault(energy.device, []).append((id(item.param), energy, group["refresh_threshold"]))
        finite, flagged, grad_norms = True, set(), {}
        shards = {id(item.param): item.shard for _, items in work for item in items if item.shard is not None}
        for device in grads.keys() | energies.keys():
            values = []
            if device in grads:
                norms = torch._foreach_norm([g for _, g in grads[device]], 2)
                if shards:
                    norms = self._whole_norms(grads[device], norms, shards)
                grad_norms.update((pid, norm) for (pid, _), norm in zip(grads[device], norms))
                # a finite 2-norm proves every entry finite (NaN and ±inf propagate through the sum of
                # squares). Only an overflowing sum of huge finite entries tests non-finite here, and
                # the exact check below then clears it.
                values.append(torch.isfinite(torch.stack(norms)).all().reshape(1))
            owners = energies.get(device, [])
            if owners:
                thresholds = [t for _, _, t in owners]
                if any(t != thresholds[0] for t in thresholds):
                    thresholds = torch.tensor(thresholds, dtype=owners[0][1].dtype).to(device, non_blocking=True)
                else:
                    thresholds = thresholds[0]
                values.append(torch.stack([e for _, e, _ in owners]).lt(thresholds))
            flags = torch.cat(values)
            read = host.read(flags, [True] * (device in grads) + [False] * (flags.numel() - (device in grads)))
            if device in grads:
                finite = finite and read.pop(0)
            flagged.update(pid for (pid, _, _), hit in zip(owners, read) if hit)
        if finite:
            return True, flagged, grad_norms
        entries = [(item.grad, item.name, group) for group, items in work for item in items]
        bad = next(((n, grp) for g, n, grp in entries if not bool(torch.isfinite(g).all())), None)
        if shards:  # every rank must take the same decision: a non-finite entry anywhere counts
            bad = self._bad_anywhere(bad, entries, shards)
        if bad is None:  # the 2-norm overflowed on finite gradients
            return True, flagged, grad_norms
        bad_name, bad_group = bad
        if bad_group["nonfinite"] == "skip":
            return False, set(), {}
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in parameter {bad_name!r}; no weight or optimizer state "
            "was changed. Use nonfinite='skip' to skip such steps instead."
        )

    @staticmethod
    def _whole_norms(pairs, norms, shards) -> list[torch.Tensor]:
        """Norms of the whole sharded gradients: one all-reduce of their squared local norms per mesh."""
        norms = list(norms)
        by_group: dict[int, list[int]] = {}
        for k, (pid, _) in enumerate(pairs):
            if pid in shards:
                by_group.setdefault(id(shards[pid].group), []).append(k)
        for positions in by_group.values():  # (a few ops per mesh, none per matrix)
            group = shards[pairs[positions[0]][0]].group
            dtypes = {norms[k].dtype for k in positions}
            sq = torch.stack([norms[k] for k in positions]).to(torch.float64).square_()
            whole = sharding.all_reduce_(sq, group).sqrt_()
            if len(dtypes) == 1:
                whole = whole.to(dtypes.pop())
            for k, value in zip(positions, whole.unbind(0)):
                norms[k] = value if value.dtype == norms[k].dtype else value.to(norms[k].dtype)
        return norms

    @staticmethod
    def _bad_anywhere(bad, entries, shards):
        """(name, group) of the first non-finite gradient over all ranks (exchanged only on this rare
        path), so that every rank raises or skips together with the same message."""
        group = next(iter(shards.values())).group
        names = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(names, None if bad is None else bad[0], group=group)
        name = next((n for n in names if n is not None), None)
        if name is None:
            return None
        return name, next(grp for _, n, grp in entries if n == name)

    def _plain_step(self, group: dict, items: list[Item], keep: torch.Tensor | None = None) -> None:
        """torch.optim.AdamW's update per device and dtype: torch's fused kernel by default, else the
        foreach kernels or a loop (``keep``: see :meth:`step_parameter`; the fused kernel's
        ``found_inf``); 8-bit moments and stochastically rounded weights chunk by chunk."""
        _refuse_on_shards(group, items)
        store = moments.get_store(group["states"])
        for item in items:
            state = self.state[item.param]
            if not state:
                state[S.STEP] = 0
                store.zeros(state, item.weight.shape, item.weight)
            state[S.STEP] += 1
        chunked = [self.state[item.param][S.EXP_AVG].dtype == torch.uint8
                   or weights.uses_stochastic_rounding(group, item.weight) for item in items]
        if any(chunked):  # 8-bit moments or stochastic rounding: chunk by chunk
            for item, by_chunks in zip(items, chunked):
                if by_chunks:
                    self._plain_step_chunked(group, item, store, keep)
            items = [item for item, by_chunks in zip(items, chunked) if not by_chunks]
            if not items:
                return
        fused = group["fused"] or (group["fused"] is None and group["foreach"] is None)
        beta1, beta2 = group["betas"]
        foreach = group["foreach"] is not False
        lr = learning_rate(group)
        for device, members in _by_device_and_dtype(items):
            states = [self.state[i.param] for i in members]
            params, grads = [i.weight for i in members], [i.grad for i in members]
            exp_avgs, exp_avg_sqs = [s[S.EXP_AVG] for s in states], [s[S.EXP_AVG_SQ] for s in states]
            if fused and inner_adam.fused_applies(params[0], group["adam_convention"]):  # keep: its found_inf
                inner_adam.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, _fused_step_counts(states, device),
                                        lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                        weight_decay=group["weight_decay"],
                                        found_inf=None if keep is None else keep.logical_not().float())
            elif keep is not None:  # (layer-wise: one parameter)
                inner_adam.masked_adamw_(params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], states[0][S.STEP], keep,
                                         lr=lr, betas=group["betas"], eps=group["eps"],
                                         weight_decay=group["weight_decay"], convention=group["adam_convention"])
            else:
                inner_adam.adamw_(params, grads, exp_avgs, exp_avg_sqs, [s[S.STEP] for s in states],
                                  lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], foreach=foreach,
                                  convention=group["adam_convention"])

    @staticmethod
    def _adam_options(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=learning_rate(group), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    convention=group["adam_convention"])

    def _plain_step_chunked(self, group: dict, item: Item, store: moments.MomentStore,
                            keep: torch.Tensor | None) -> None:
        """AdamW on one plain parameter, in chunks of whole 8-bit blocks: dequantize a chunk's moments,
        step it in fp32 (the weight too, when it is stochastically rounded), store it back. The fp32
        working set is one chunk, whatever the parameter's size (an embedding of LLaMA-7B: 131M values)."""
        state = self.state[item.param]
        quantized = state[S.EXP_AVG].dtype == torch.uint8
        rounding = weights.uses_stochastic_rounding(group, item.weight)
        generator = (weights.rounding_generator(group, item.ordinal, state[S.STEP], item.weight.device)
                     if rounding else None)
        work = item.weight if item.weight.is_contiguous() else item.weight.contiguous()
        flat_weight, flat_grad = work.view(-1), item.grad.reshape(-1)
        numel = flat_weight.numel()
        spans = moments.chunk_spans(numel)
        options = self._adam_options(group)
        for span in spans:
            if quantized:
                exp_avg, exp_avg_sq = store.load_span(state, span)
            else:
                exp_avg, exp_avg_sq = state[S.EXP_AVG].view(-1)[span], state[S.EXP_AVG_SQ].view(-1)[span]
            weight = flat_weight[span].float() if rounding else flat_weight[span]
            grad = flat_grad[span].to(exp_avg.dtype)
            if keep is None:
                inner_adam.adamw_([weight], [grad], [exp_avg], [exp_avg_sq], [state[S.STEP]], foreach=False, **options)
            else:
                inner_adam.masked_adamw_(weight, grad, exp_avg, exp_avg_sq, state[S.STEP], keep,
                                         betas=(options["beta1"], options["beta2"]), lr=options["lr"],
                                         eps=options["eps"], weight_decay=options["weight_decay"],
                                         convention=options["convention"])
            if quantized:
                store.save_span(state, span, exp_avg, exp_avg_sq, keep)
            if rounding:
                weights.stochastic_round_(flat_weight[span], weight, generator)
        if work is not item.weight:
            item.weight.copy_(work)

    # ------------------------------------------------------------------ projected step
    def _projected_step(self, group: dict, items: list[Item], flagged: set[int],
                        grad_norms: dict[int, torch.Tensor], keep: torch.Tensor | None = None,
                        refresh: bool = True) -> set[int]:
        """Refresh what is due, then step every bucket; returns the ids of the refreshed parameters.
        ``refresh=False``: a steady step of ``capturable=True`` (nothing is due; ``keep`` masks it)."""
        plan = self._plan(group)
        _refuse_on_shards(group, items)
        if not plan.rule.shard_aware and any(item.shard is not None for item in items):
            raise ValueError(f"residual={group['residual']!r} is not shard_aware: it cannot step FSDP2-sharded "
                             "parameters (see residual.py: take norms through the Bucket and set shard_aware)")
        for item in items:
            state = self.state[item.param]
            if not state:
                S.init_projected(state, item.weight, norm_dtype(item.weight.dtype))
        if plan.transform.active:  # G̃ from G before the refresh and the projection (transforms.py)
            for item in items:
                item.grad = plan.transform.before(item.grad.unsqueeze(0), [self.state[item.param]], group)[0]
                grad_norms.pop(id(item.param), None)  # the rules see G̃: its norm is taken anew
        refreshed = subspace.refresh_(self, group, items, flagged) if refresh else set()
        captured = [] if plan.trigger else None
        lr = learning_rate(group) if refresh else group["lr"]  # (a capturable step never reads a tensor η)
        for members in self._buckets(group, items):
            self._bucket_step(group, plan, members, grad_norms, lr, keep, captured, sanitize=not refresh)
        if captured:
            self._record_energy(group, captured, grad_norms, refreshed, keep)
        return refreshed

    def _buckets(self, group: dict, items: list[Item]) -> list[list[Item]]:
        """Items of equal device, dtype, shape, side and low-rank shape, in chunks of at most
        ``bucket_cap_mb`` of gradient (at least one matrix each)."""
        by_key: dict[tuple, list[Item]] = {}
        for item in items:
            low_shape = tuple(moments.low_shape(self.state[item.param]))
            key = (item.weight.device, item.weight.dtype, item.full_shape, low_shape,
                   None if item.shard is None else id(item.shard.group))
            by_key.setdefault(key, []).append(item)
        buckets = []
        for (device, *_), members in by_key.items():
            cap = group["bucket_cap_mb"]
            if cap is None:  # FSDP2 shards stack on the CPU too: there a bucket's collectives cost latency
                cap = 0.0 if device.type == "cpu" and members[0].shard is None else DEFAULT_BUCKET_CAP_MB
            cap *= MIB
            size = members[0].grad.numel() * members[0].grad.element_size()
            per_bucket = max(1, int(cap // size)) if size else len(members)
            buckets.extend(members[k:k + per_bucket] for k in range(0, len(members), per_bucket))
        return buckets

    def _bucket_step(self, group: dict, plan: GroupPlan, members: list[Item], grad_norms: dict[int, torch.Tensor],
                     lr, keep: torch.Tensor | None = None, captured: list | None = None, sanitize: bool = False) -> None:
        """One step of a bucket (:func:`update.bucket_update_`) at η ``lr``. ``keep`` (a 0-d bool on the device):
        when false nothing of the bucket changes — the layer-wise mode (one matrix, its gradient
        already zeroed where non-finite) and ``capturable=True`` (``sanitize``: the gradients are
        zeroed here). ``captured`` collects (members, ‖R‖ per matrix) for the convergence trigger."""
        states = [self.state[i.param] for i in members]
        _advance_counters(states, (S.STEP, S.ADAM_STEP), keep)
        params = [i.weight for i in members]
        single = len(members) == 1  # a view, no copy: the stack of one matrix
        grads = members[0].grad.unsqueeze(0) if single else torch.stack([i.grad for i in members])
        if sanitize:  # (the view of one matrix is the caller's gradient: copied, never written)
            grads = torch.where(keep, grads, 0) if single else grads.masked_fill_(keep.logical_not(), 0)
        side = projection_side(group["proj_type"], members[0].full_shape)
        shard = None if members[0].shard is None else sharding.BucketShard(members[0].shard, side)
        left, right = subspace.stacked_projection(group, plan, members, states, side)
        norms = [grad_norms.get(id(i.param)) for i in members]  # the non-finite check's ‖G‖ (rules reuse them)
        after_projection = None
        if plan.transform.active or captured is not None:
            def after_projection(low):
                if plan.transform.active:
                    plan.transform.after(grads, low, left, right, states, group, keep)
                if captured is not None:
                    low_norms = (torch.linalg.vector_norm(low, dim=(-2, -1), dtype=norm_dtype(low.dtype))
                                 if shard is None else shard.matrix_norms(low).view(-1))
                    captured.append((members, low_norms))
        store = moments.get_store(group["states"])
        exp_avgs, exp_avg_sqs = store.load(states)
        previous = torch.stack([s[S.RESIDUAL_NORM] for s in states]) if plan.rule.has_residual else None
        rounding = weights.uses_stochastic_rounding(group, params[0])
        generators = ([weights.rounding_generator(group, i.ordinal, s[S.STEP], i.weight.device)
                       for i, s in zip(members, states)] if rounding else None)
        unit_state = self._unit_state(plan.rule, members, states)
        adam_steps = [s[S.ADAM_STEP] for s in states]
        compiled = (group["compile"] and shard is None and after_projection is None and not rounding
                    and (keep is None or sanitize))
        if compiled:  # what changes from step to step enters as tensors: no recompilation
            adam_steps, lr = _as_device_scalars(adam_steps, lr, grads.device)
        step = plan.bucket_update(side, compiled)
        kept, factors, residual_sq, new_state = step(
            params, grads, left, right, exp_avgs, exp_avg_sqs, adam_steps, norms, previous, unit_state, lr, keep,
            shard=shard, after_projection=after_projection, generators=generators)
        store.save(states, exp_avgs, exp_avg_sqs, keep)
        self._keep_norms(states, kept, previous, keep, residual_sq, factors)
        self._keep_unit_state(states, new_state, keep)

    @staticmethod
    def _unit_state(rule: Rule, members: list[Item], states: list[dict]) -> dict[str, torch.Tensor]:
        """The rule's declared state (``Rule.state``), created for new matrices, stacked over the bucket."""
        stacked = {}
        for key, make in rule.state.items():
            for item, state in zip(members, states):
                if key not in state:
                    state[key] = make(item.weight)
            stacked[key] = torch.stack([s[key] for s in states])
        return stacked

    @staticmethod
    def _keep_unit_state(states: list[dict], new_state: dict | None, keep: torch.Tensor | None) -> None:
        """Write the rule's new state back (unchanged where ``keep`` is false)."""
        for key, value in (new_state or {}).items():
            old = [s[key] for s in states]
            if keep is not None:
                value = torch.where(keep, value, torch.stack(old))
            torch._foreach_copy_(old, list(value.unbind(0)))

    def _keep_norms(self, states, kept, previous, keep, residual_sq, factors) -> None:
        """Store the limiter's kept norms (unchanged where ``keep`` is false) and the step's statistics."""
        if kept is not None:
            if keep is not None:
                kept = torch.where(keep, kept, previous)
            torch._foreach_copy_([s[S.RESIDUAL_NORM] for s in states], list(kept.unbind(0)))
        if residual_sq is not None:
            self._record_stats(residual_sq, factors)

    # ------------------------------------------------------------------ layer-wise
    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor, flagged: bool = False) -> tuple[torch.Tensor, dict | None]:
        """Step one parameter with its current gradient, without a host synchronisation (the
        layer-wise mode, ``layerwise.py``). A non-finite gradient is caught on the device: the
        parameter and its state are left as they were (``torch.where``), and the returned 0-d bool
        ``finite`` tells the caller, who reads every parameter's flag in one transfer and then calls
        :meth:`undo_step` for the non-finite ones. Returns (finite, the state before a refresh made
        at this step, or None)."""
        group, index, ordinal, name = self.locate(param)
        _check_dense(param.grad, name)
        if sharding.is_distributed_tensor(param):
            raise ValueError(f"parameter {name!r} is FSDP2-sharded: the layer-wise mode steps whole parameters "
                             "in backward hooks and does not support FSDP2; use the ordinary step")
        norm = torch.linalg.vector_norm(param.grad, dtype=norm_dtype(param.grad.dtype))
        finite = torch.isfinite(norm)
        grad = torch.where(finite, param.grad.neg() if group["maximize"] else param.grad,
                           torch.zeros((), dtype=param.grad.dtype, device=param.grad.device))
        item = Item(ordinal, index, param, grad, name)
        if not is_projected(group):
            self._plain_step(group, [item], keep=finite)
            return finite, None
        before = dict(self.state[param])
        refreshed = self._projected_step(group, [item], {id(param)} if flagged else set(), {id(param): norm.where(finite, 0.0)},
                                         keep=finite)
        return finite, (before if refreshed else None)

    def undo_step(self, param: torch.Tensor, before_refresh: dict | None) -> None:
        """Take back the counters (and a refresh) of a step that :meth:`step_parameter` masked."""
        state = self.state[param]
        if before_refresh is not None:
            state.clear()
            state.update(before_refresh)
            return
        state[S.STEP] -= 1
        if S.ADAM_STEP in state:
            state[S.ADAM_STEP] -= 1

    def locate(self, param: torch.Tensor) -> tuple[dict, int, int, str]:
        """(group, index in group, ordinal over all groups, name) of a parameter."""
        index_of = getattr(self, "_index_of", None)
        if index_of is None or id(param) not in index_of:
            index_of = {id(p): (group, k, ordinal, name) for group, k, ordinal, p, name in self.named_parameters()}
            self._index_of = index_of
            if id(param) not in index_of:
                raise ValueError("step_parameter: the parameter is in none of this optimizer's groups")
        return index_of[id(param)]

    def _record_energy(self, group, captured, grad_norms, refreshed, keep=None) -> None:
        """The captured energy's moving average per matrix (``refresh.py``), for the whole group at
        once; a matrix refreshed at this step (or new) starts its average at this step's value."""
        members = [item for bucket_members, _ in captured for item in bucket_members]
        states = [self.state[item.param] for item in members]
        low_norms = captured[0][1] if len(captured) == 1 else torch.cat([norms for _, norms in captured])
        norms = [grad_norms.get(id(item.param)) for item in members]
        if None in norms or norms[0].dtype != low_norms.dtype:
            norms = [torch.linalg.vector_norm(item.grad, dtype=low_norms.dtype) for item in members]
        energy = stacked_energy(low_norms, torch.stack(norms))
        if all(S.CAPTURED_ENERGY in s and id(i.param) not in refreshed for i, s in zip(members, states)):
            averages = [s[S.CAPTURED_ENERGY] for s in states]
            weight = 1.0 - group["refresh_beta"] if keep is None else keep * (1.0 - group["refresh_beta"])
            stacked = torch.stack(averages).lerp_(energy, weight)
            torch._foreach_copy_(averages, list(stacked.unbind(0)))
            return
        for k, (item, state) in enumerate(zip(members, states)):
            record_energy_(state, energy[k].clone(), id(item.param) in refreshed, group["refresh_beta"])

    def _record_stats(self, residual_sq: torch.Tensor, factors: torch.Tensor | None) -> None:
        stats = self._residual_stats
        if stats is None:
            return
        limited = torch.zeros_like(residual_sq) if factors is None else (factors < 1).to(residual_sq.dtype)
        post = residual_sq if factors is None else residual_sq * factors.square()
        sums = torch.stack([residual_sq.sum(), post.sum(), limited.sum()])
        if "sums" in stats:
            sums = sums.to(stats["sums"].device) + stats["sums"]
        stats["sums"] = sums
        stats["pre_sq"], stats["post_sq"], stats["limited"] = sums.unbind(0)
        stats["count"] += residual_sq.numel()
