"""Memory: the traced peak of real training steps (``trace``, on fake tensors; sharded over N
ranks with ``fsdp=True``) and the optimizer state's bytes and the paper's estimate (``estimate``,
appendix A.8); see the two modules.

The names load on first use (torch comes with them), so that ``fullrank memory --help`` answers
without importing torch. ``fullrank.memory.estimate`` is the function: loading the module of the
same name puts the function in its place.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "estimate": ("ESTIMATE_METHODS", "GB", "GIB", "PAPER_CONVENTION", "PAPER_TABLE2", "element_counts", "estimate",
                 "format_paper_comparison", "optimizer_state_bytes", "paper_comparison", "projected_state_bytes"),
    "tracer": ("CATEGORIES", "COMMUNICATION_CATEGORIES", "MemoryTrace", "adamw_settings", "fewest_ranks",
               "largest_batch", "trace"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    module_name = _MODULE_OF.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    for exported in _EXPORTS[module_name]:
        globals()[exported] = getattr(module, exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
