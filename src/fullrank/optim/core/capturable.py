"""``capturable=True``: the host's schedule of the device step counters.

The counters are 0-d device tensors, advanced on the device by every unmasked step. The host knows a
matrix's count only within [known, known + calls since it last read it]; a step is *steady* when no
refresh can be due at any count in those bounds, and then reads nothing. Otherwise the step reads the
counters (one transfer per device), runs as the default step with int counters, and writes them back
into the same device tensors (a compiled steady step keeps reading those)."""
from __future__ import annotations

import contextlib

import torch

from ..base import host
from ..base.counters import COUNTER_KEYS, STEP
from ..units.schedule import refresh_possible, stagger_offset
from .buckets import GroupWork


class CounterSchedule:
    """What the host knows of each parameter's device step count: [last read, calls since]."""

    def __init__(self):
        self._known: dict[int, list[int]] = {}

    def steady(self, work: list[GroupWork], states) -> bool:
        """Whether no parameter of this step can need the host: every one has been stepped since the
        last synchronised step, and no refresh can be due at any step count its matrix may have
        reached."""
        if not any(part.items for part in work):
            return False
        for part in work:
            count = len(part.group["params"])
            for item in part.items:
                known = self._known.get(id(item.param))
                if known is None:
                    return False
                if part.plan.units is not None and refresh_possible(
                        part.plan.values, states[item.param], known[0], sum(known),
                        stagger_offset(part.plan.values, item.index, count)):
                    return False
        return True

    def stepped(self, work: list[GroupWork]) -> None:
        """Count a steady step of every parameter of ``work``."""
        for part in work:
            for item in part.items:
                self._known[id(item.param)][1] += 1

    @contextlib.contextmanager
    def counters_on_host(self, work: list[GroupWork], states):
        """Around a synchronised step: the device counters of the step's parameters read as ints (one
        transfer per device), written back in place afterwards."""
        pairs = [(item, states[item.param]) for part in work for item in part.items]
        held, by_device = {}, {}
        for _, state in pairs:
            for key in COUNTER_KEYS:
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
            self._restore(pairs, held)

    def _restore(self, pairs: list, held: dict) -> None:
        """The int counters back into their device tensors (new ones for new states)."""
        for item, state in pairs:
            if isinstance(state.get(STEP), int):
                self._known[id(item.param)] = [state[STEP], 0]
            for key in COUNTER_KEYS:
                value = state.get(key)
                if value is None or isinstance(value, torch.Tensor):
                    continue
                counter = held.get((id(state), key))
                if counter is None:
                    counter = torch.zeros((), dtype=torch.float32, device=item.weight.device)
                state[key] = counter.fill_(value)
