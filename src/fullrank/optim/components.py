"""What every unit of the engine declares about itself: its options (default, check, meaning) and
the state keys it keeps, as optax's transformations own their ``init`` and ``update``.

A unit is an update rule (``residual.py``), a limiter (``limiter.py``), a moment store
(``moments.py``), an SVD backend (``svd.py``), a projector (``random_proj.py``), a pre-projection
transform (``transforms.py``), or one of the subspace policy's modules (``rank.py``, ``refresh.py``,
``switch.py``) through their module-level ``OPTIONS``. ``SubspaceAdamW`` merges every declaration
into its defaults; nothing in the engine or in ``options.py`` lists a unit's option names.

Adding a rule with a hyperparameter and state of its own is one file::

    class Damped(Rule):
        name = "damped"
        options = {"damping": Option(0.5, number(0.0, 1.0), "weight of the previous residual")}
        state = {"previous_phi": scalar_state}     # (key → how to make it for a parameter)
        def contribution(self, bucket, options): ...

    register_rule(Damped())
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False, integer=False,
                error: type[Exception] = ValueError):
    """Raise ``error`` (ValueError; the CLIs' ConfigError) unless ``low (<|<=) value (<|<=) high``; the
    message names ``name`` and states the range. The project's one range checker."""
    ok = _is_int(value) if integer else _is_real(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise error(f"{name} must be {kind} in {interval}, got {value!r}")


Check = Callable[[str, Any], None]


def number(low: float = -math.inf, high: float = math.inf, *, low_open=False, high_open=False) -> Check:
    """A real number in the interval."""
    return lambda name, value: check_range(name, value, low, high, low_open=low_open, high_open=high_open)


def integer(low: float = -math.inf, high: float = math.inf) -> Check:
    """An integer in [low, high]."""
    return lambda name, value: check_range(name, value, low, high, integer=True)


def choice(*values) -> Check:
    """One of ``values``."""
    def check(name, value):
        if value not in values:
            raise ValueError(f"{name} must be one of {values}, got {value!r}")
    return check


def flag(name: str, value) -> None:
    """True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def optional(check: Check) -> Check:
    """None, or what ``check`` accepts."""
    return lambda name, value: None if value is None else check(name, value)


@dataclass(frozen=True)
class Option:
    """A declared option: its default, its check (raises ValueError naming the option) and meaning."""

    default: Any
    check: Check
    doc: str = ""


def scalar_state(param: torch.Tensor) -> torch.Tensor:
    """A 0-d fp32 (or wider) zero on the parameter's device: a unit's per-matrix statistic."""
    return torch.zeros((), dtype=torch.promote_types(param.dtype, torch.float32), device=param.device)


def like_param_state(param: torch.Tensor) -> torch.Tensor:
    """A zero tensor of the parameter's shape and dtype (e.g. an error-feedback buffer)."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class Component:
    """Base of the engine's units: a ``name``, declared ``options`` and ``state`` (key → factory of
    the initial tensor for a parameter), and ``validate(group)`` for checks across options."""

    name = ""
    options: dict[str, Option] = {}
    state: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def validate(self, group: dict) -> None:
        """Checks across the group's options (each option's own check has run)."""


_REGISTRIES: list["Registry"] = []  # every registry, so that a new unit's options are checked against all
_TABLES: list[dict] = []  # option tables declared outside registries (the engine's, the subspace policy's)


def declare(table: dict[str, "Option"]) -> dict[str, "Option"]:
    """Declare an option table that is not a unit's (checked against every unit's); returns it."""
    merge_options(*_TABLES, *(r.options() for r in _REGISTRIES), table)
    _TABLES.append(table)
    return table


class Registry:
    """The units of one kind, selected by the group option ``option`` (e.g. ``residual``); reads like a
    dict of names (``name in registry``, ``tuple(registry)``, ``registry.pop(name)``)."""

    def __init__(self, kind: str, option: str, base: type = Component):
        self.kind, self.option, self.base = kind, option, base
        self._units: dict[str, Component] = {}
        _REGISTRIES.append(self)

    def register(self, unit: Component) -> None:
        """Add ``unit`` (or replace the unit of its name); its options must not clash with others'."""
        if not isinstance(unit, self.base) or not unit.name:
            raise TypeError(f"a {self.kind} must be a {self.base.__module__}.{self.base.__name__} instance with a "
                            f"non-empty name, got {unit!r}")
        others = [u for name, u in self._units.items() if name != unit.name]
        merge_options(*_TABLES, *(r.options() for r in _REGISTRIES if r is not self),
                      *(u.options for u in others), unit.options)  # raises on a clash with any declaration
        self._units[unit.name] = unit

    def get(self, name: str) -> Component:
        if name not in self._units:
            raise ValueError(f"{self.option} must be one of {tuple(self._units)}, got {name!r}")
        return self._units[name]

    def pop(self, name: str, default=None):
        return self._units.pop(name, default)

    def units(self) -> list[Component]:
        return list(self._units.values())

    def __contains__(self, name) -> bool:
        return name in self._units

    def __iter__(self):
        return iter(tuple(self._units))

    def options(self) -> dict[str, Option]:
        """Every option its units declare (a shared option is one declaration)."""
        return merge_options(*(u.options for u in self._units.values()))


def merge_options(*tables: dict[str, Option]) -> dict[str, Option]:
    """One table from several; the same name declared twice must be the same declaration."""
    merged: dict[str, Option] = {}
    for table in tables:
        for key, option in table.items():
            if key in merged and merged[key] != option:
                raise ValueError(f"option {key!r} is declared twice, differently (one Option object must be shared, "
                                 "or the names must differ)")
            merged[key] = option
    return merged
