"""fullrank: full-rank training of LLMs under a low-rank optimizer-state constraint.

Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"), GaLore and their ablations as one ``torch.optim`` engine, ``SubspaceAdamW``.

The names of ``fullrank.optim.__all__`` (``fullrank.Fira``, ``fullrank.make_optimizer``, ...),
``fullrank.memory`` and ``OPTIMIZER_METHODS`` load on first use, so that the command line answers
``--help`` and ``--version`` without importing torch.
"""
from __future__ import annotations

import importlib

from ._quiet import quiet_third_party

__version__ = "0.1.0"

# bitsandbytes (8-bit states; imported by peft and galore-torch too) logs about optional kernels of
# its CPU backend on import: quieted by logger name and level, for the command line and user scripts
quiet_third_party()

_SUBPACKAGES = ("optim", "memory")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    optim = importlib.import_module(".optim", __name__)
    if name == "__all__":
        value = [*optim.__all__, "OPTIMIZER_METHODS", "memory"]
    elif name == "OPTIMIZER_METHODS":
        value = optim.optimizer_methods()
    elif name in optim.__all__:
        value = getattr(optim, name)
    else:
        raise AttributeError(f"module 'fullrank' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES, *__getattr__("__all__")})
