"""What every unit of the engine declares about itself: its options (default, check, meaning), the
per-matrix state it keeps, and what a subspace switch does to that state, as optax's
transformations own their ``init`` and ``update``.

A unit is an update rule (``units/rules.py``), a limiter (``units/limiters.py``), a moment store
(``units/moments.py``), an SVD backend (``units/svd.py``), a projector (``units/projectors.py``), a
pre-projection transform (``units/transforms.py``), a weight writer (``units/weights.py``), or one of
the subspace policy's units (``units/rank.py``, ``units/schedule.py``, ``units/switch.py``).
``SubspaceAdamW`` merges every declaration into its defaults; nothing in the engine lists a unit's
option names or state keys.

Adding a rule with a hyperparameter and state of its own is one file::

    class Damped(Rule):
        name = "damped"
        options = {"damping": Option(0.5, number(0.0, 1.0), "weight of the previous residual")}
        state = {"previous_phi": scalar_state}     # (key → how to make it for a parameter)
        def contribution(self, bucket, values): ...

    register_rule(Damped())
"""
from __future__ import annotations

from typing import Callable

import torch

from .norms import norm_dtype
from .options import Option, OptionValues, merge_options

StateFactory = Callable[[torch.Tensor], torch.Tensor]


def scalar_state(param: torch.Tensor) -> torch.Tensor:
    """A 0-d fp32 (or wider) zero on the parameter's device: a unit's per-matrix statistic."""
    return torch.zeros((), dtype=norm_dtype(param.dtype), device=param.device)


def like_param_state(param: torch.Tensor) -> torch.Tensor:
    """A zero tensor of the parameter's shape and dtype (e.g. an error-feedback buffer)."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class Unit:
    """Base of the engine's units: a ``name``, declared ``options`` and ``state`` (key → factory of
    the initial tensor for a parameter, made when a step first needs it; None: the unit makes it
    itself), ``validate(values)`` for checks across options, and :meth:`at_switch`: what a new
    subspace does to its state."""

    name = ""
    options: dict[str, Option] = {}
    state: dict[str, StateFactory | None] = {}

    def validate(self, values: OptionValues) -> None:
        """Checks across the group's options (each option's own check has run)."""

    def at_switch(self, state: dict, values: OptionValues) -> None:
        """What a new subspace of the matrix does to this unit's entries of its ``state`` (called once
        the new P is installed). Default: they are kept."""

    def kept_dtype_keys(self) -> tuple[str, ...]:
        """State keys whose tensors keep their own dtype when a checkpoint is loaded (torch casts
        floating-point state to the parameter's): by default every declared key."""
        return tuple(self.state)


_REGISTRIES: list["Registry"] = []  # every registry, so that a new unit's options are checked against all
_TABLES: list[dict] = []  # option tables declared outside registries (the engine's, the subspace policy's)
_POLICIES: list[Unit] = []  # units that are no registry's choice (the subspace policy's), declared once
_VERSION = [0]  # counts declarations: a group's plan is rebuilt after a unit is registered


def declaration_version() -> int:
    """Changes whenever an option table or a unit is declared (plans built before are stale)."""
    return _VERSION[0]


def declare(table: dict[str, Option]) -> dict[str, Option]:
    """Declare an option table that is not a unit's (checked against every unit's); returns it."""
    merge_options(*_TABLES, *(r.options() for r in _REGISTRIES), table)
    _TABLES.append(table)
    _VERSION[0] += 1
    return table


def declare_policy(unit: Unit) -> Unit:
    """Declare a unit that every projected group uses (no option selects it): its options and state."""
    declare(unit.options)
    _POLICIES.append(unit)
    return unit


def policies() -> tuple[Unit, ...]:
    return tuple(_POLICIES)


class Registry:
    """The units of one kind, selected by the group option ``option`` (e.g. ``residual``); reads like a
    dict of names (``name in registry``, ``tuple(registry)``, ``registry.pop(name)``)."""

    def __init__(self, kind: str, option: str, base: type = Unit):
        self.kind, self.option, self.base = kind, option, base
        self._units: dict[str, Unit] = {}
        _REGISTRIES.append(self)

    def register(self, unit: Unit) -> None:
        """Add ``unit`` (or replace the unit of its name); its options must not clash with others'."""
        if not isinstance(unit, self.base) or not unit.name:
            raise TypeError(f"a {self.kind} must be a {self.base.__module__}.{self.base.__name__} instance with a "
                            f"non-empty name, got {unit!r}")
        others = [u for name, u in self._units.items() if name != unit.name]
        merge_options(*_TABLES, *(r.options() for r in _REGISTRIES if r is not self),
                      *(u.options for u in others), unit.options)  # raises on a clash with any declaration
        self._units[unit.name] = unit
        _VERSION[0] += 1

    def get(self, name: str) -> Unit:
        if name not in self._units:
            raise ValueError(f"{self.option} must be one of {tuple(self._units)}, got {name!r}")
        return self._units[name]

    def pop(self, name: str, default=None):
        _VERSION[0] += 1
        return self._units.pop(name, default)

    def units(self) -> list[Unit]:
        return list(self._units.values())

    def __contains__(self, name) -> bool:
        return name in self._units

    def __iter__(self):
        return iter(tuple(self._units))

    def options(self) -> dict[str, Option]:
        """Every option its units declare (a shared option is one declaration)."""
        return merge_options(*(u.options for u in self._units.values()))


def registries() -> tuple[Registry, ...]:
    return tuple(_REGISTRIES)


def declared_tables() -> tuple[dict[str, Option], ...]:
    return tuple(_TABLES)
