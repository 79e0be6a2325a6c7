"""A group's options resolved once into its plan: typed values and the units they select, rebuilt (and
validated again) only when one of the group's options changes or a unit is registered."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..base.options import OptionValues
from ..base.units import declaration_version
from ..units.adam import AdamOptions
from ..units.limiters import LIMITER_REGISTRY, Limiter
from ..units.moments import STORE_REGISTRY, MomentStore
from ..units.projectors import PROJECTOR_REGISTRY, Projector
from ..units.rules import RULE_REGISTRY, Rule
from ..units.schedule import uses_trigger
from ..units.svd import SVD_REGISTRY, SVDBackend
from ..units.transforms import TRANSFORM_REGISTRY, Transform
from ..units.weights import WeightWriter, select_writer
from .compute import BucketKernel, run_bucket
from .group_options import GROUP_KEYS, engine_options, validate_group

# Graphs one compiled bucket step may hold: one per bucket signature (shapes, bucket size, dtype). Every
# bucket shares the code of ``compute.run_bucket``, whose graphs Dynamo counts together, and its default
# limit (8) is below the bucket signatures of a large model.
BUCKET_GRAPHS = 256


def is_projected(group: dict) -> bool:
    """A group is projected when it carries a rank, as in GaLore's param groups."""
    return group.get("rank") is not None


def parameter_names(group: dict, offset: int = 0) -> list[str]:
    """The group's ``param_names`` or positional names ``param <k>``."""
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"param {offset + k}" for k in range(len(group["params"]))]


def learning_rate(group: dict) -> float:
    """The group's η as a float (a 0-d tensor ``lr``, as torch optimizers accept, is read here)."""
    lr = group["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


@dataclass(frozen=True)
class ProjectionUnits:
    """The units a projected group selects."""

    rule: Rule
    limiter: Limiter
    projector: Projector
    svd: SVDBackend
    transform: Transform

    def all(self) -> tuple:
        return (self.rule, self.limiter, self.projector, self.svd, self.transform)

    def stepped(self) -> tuple:
        """The units whose declared state a bucket's compute reads and returns: the rule, and the
        limiter when the rule has a residual for it to limit."""
        return (self.rule, self.limiter) if self.rule.has_residual else (self.rule,)


@dataclass(frozen=True)
class GroupPlan:
    """A group's options resolved: ``values`` (every option, typed), Adam's hyperparameters, where the
    moments live, and for a projected group its units (None for a plain group)."""

    values: OptionValues
    adam: AdamOptions
    store: MomentStore
    units: ProjectionUnits | None
    kernels: dict = field(default_factory=dict, compare=False)  # (side, compiled) → the bucket step

    @property
    def trigger(self) -> bool:
        """The convergence-triggered refresh is on (τ > 0)."""
        return self.units is not None and uses_trigger(self.values)

    def writer(self, dtype: torch.dtype) -> WeightWriter:
        """The weight writer of this group's weights of ``dtype``."""
        return select_writer(dtype, self.values.stochastic_rounding)

    def bucket_step(self, side: str, compiled: bool):
        """:func:`compute.run_bucket` with this plan's constants bound, compiled (``fullgraph=True``)
        when ``compiled``."""
        key = (side, compiled)
        if key not in self.kernels:
            kernel = BucketKernel(self.units.rule, self.units.limiter, self.units.transform, self.values, side,
                                  self.adam, self.trigger)
            step = functools.partial(run_bucket, kernel)
            self.kernels[key] = _compiled_per_bucket(step) if compiled else step
        return self.kernels[key]


def _compiled_per_bucket(fn):
    """``torch.compile(fn, fullgraph=True, dynamic=False)``, allowed a graph per bucket signature."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # inside the caller's own torch.compile(opt.step): inlined
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=BUCKET_GRAPHS):
            return compiled(*args, **kwargs)
    return run


def build_plan(group: dict, names: list[str]) -> GroupPlan:
    """Validate ``group`` and resolve it into its plan."""
    values = validate_group(group, names)
    units = None
    if is_projected(group):
        units = ProjectionUnits(RULE_REGISTRY.get(values.residual), LIMITER_REGISTRY.get(values.limiter),
                                PROJECTOR_REGISTRY.get(values.projector), SVD_REGISTRY.get(values.svd),
                                TRANSFORM_REGISTRY.get(values.pre_projection))
    return GroupPlan(values, AdamOptions.of(values), STORE_REGISTRY.get(values.states), units)


class Plans:
    """Each group's plan, kept while its options and the declared units stay as they are."""

    _MISSING = object()

    def __init__(self):
        self._plans: dict[int, tuple] = {}
        self._names: tuple[int, tuple[str, ...]] | None = None

    def _option_names(self) -> tuple[str, ...]:
        """The options a plan depends on, but ``lr`` and ``capturable`` (``of`` reads that one as a bool)."""
        version = declaration_version()
        if self._names is None or self._names[0] != version:
            names = (*(n for n in engine_options() if n != "lr"), *GROUP_KEYS)
            self._names = (version, tuple(n for n in names if n != "capturable"))
        return self._names[1]

    def of(self, group: dict, offset: int = 0) -> GroupPlan:
        """The plan of ``group`` (``offset``: its first parameter's position over all groups, for names).
        ``capturable`` is compared as a bool: from torch 2.15, Dynamo hands a compiled step a trace-time
        stand-in for it that converts to bool and supports nothing else."""
        names = self._option_names()
        capturable = group.get("capturable", self._MISSING)
        signature = (declaration_version(), tuple(group.get(name, self._MISSING) for name in names),
                     capturable if capturable is self._MISSING else bool(capturable))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == signature:
            return cached[1]
        plan = build_plan(group, parameter_names(group, offset))
        self._plans[id(group)] = (signature, plan)
        return plan

    def clear(self) -> None:
        self._plans.clear()
