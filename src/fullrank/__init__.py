"""fullrank: full-rank training of LLMs under a low-rank optimizer-state constraint.

Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"), GaLore and their ablations as one ``torch.optim`` engine, ``SubspaceAdamW``.
"""
from . import memory, optim
from .optim import *  # noqa: F403 (the optimizers' one export list, fullrank.optim.__all__)
from .optim import optimizer_methods

OPTIMIZER_METHODS = optimizer_methods()
__version__ = "0.1.0"

__all__ = [*optim.__all__, "OPTIMIZER_METHODS", "memory"]
