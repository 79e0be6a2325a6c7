"""fullrank: full-rank training of LLMs under a low-rank optimizer-state constraint.

Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"), GaLore and their ablations as one ``torch.optim`` engine, ``SubspaceAdamW``.
"""
from . import memory
from .optim import (
    APOLLO,
    PRESETS,
    APOLLO_Mini,
    AdaRankGrad,
    FRUGAL,
    LDAdam,
    Fira,
    FiraAdaptive,
    GaLore,
    LayerwiseOptimizer,
    NonFiniteGradientError,
    SubspaceAdamW,
    fira_grad_clipping,
    fira_matrix,
    fira_no_limiter,
    fira_no_scaling,
    fira_only_scaling,
    layerwise,
    make_optimizer,
    optimizer_methods,
    param_groups,
)

OPTIMIZER_METHODS = optimizer_methods()
__version__ = "0.1.0"

__all__ = [
    "SubspaceAdamW", "Fira", "GaLore", "AdaRankGrad", "FiraAdaptive", "APOLLO", "APOLLO_Mini", "FRUGAL", "LDAdam",
    "fira_matrix", "fira_no_scaling", "fira_no_limiter", "fira_grad_clipping", "fira_only_scaling",
    "PRESETS", "OPTIMIZER_METHODS", "make_optimizer", "optimizer_methods", "param_groups", "layerwise",
    "LayerwiseOptimizer", "NonFiniteGradientError", "memory",
]
