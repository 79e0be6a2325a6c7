"""Options: their declaration (default, check, meaning), the checks, and a group's values resolved
into one frozen, typed object.

Every check raises (ValueError, or the CLIs' ConfigError) with a message that names the option and
states the allowed range. :class:`OptionValues` is what the step's units read: attributes
(``values.gamma``), validated once when a group's plan is built, never looked up by string inside
the step.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable


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


def resolve(owner: str, table: dict[str, Option], given: dict) -> dict:
    """``given`` options checked against ``table`` (declared names only, each by its check), with the
    defaults of the others: {name: value} of every declared option. An unknown name is a TypeError
    that lists the declared ones."""
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {', '.join(map(repr, unknown))}; the options "
                        f"are: {', '.join(sorted(table))}")
    for name, value in given.items():
        table[name].check(name, value)
    return {name: given.get(name, option.default) for name, option in table.items()}


class OptionValues:
    """A group's option values as one frozen object: ``values.gamma``. Made by :meth:`of`, one class
    per set of names (a frozen dataclass, so a compiled step treats the values as constants).
    ``values["gamma"]`` reads the same value, for units written against a dict of options."""

    __slots__ = ()
    _classes: dict[tuple[str, ...], type] = {}

    @classmethod
    def of(cls, values: dict[str, Any]) -> "OptionValues":
        names = tuple(values)
        made = cls._classes.get(names)
        if made is None:
            made = dataclasses.make_dataclass("OptionValues", [(name, Any) for name in names], bases=(cls,),
                                              frozen=True, slots=True)
            cls._classes[names] = made
        return made(**values)

    def __getitem__(self, name: str):
        return getattr(self, name)
