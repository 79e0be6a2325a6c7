"""The optimizer engine: projector × inner Adam × residual rule × limiter, and its presets."""
from .engine import NonFiniteGradientError, SubspaceAdamW, is_projected
from .frugal import FRUGAL
from .ldadam import LDAdam
from .groups import param_groups
from .layerwise import LayerwiseOptimizer, layerwise
from .presets import (
    APOLLO,
    PRESETS,
    APOLLO_Mini,
    AdaRankGrad,
    Fira,
    FiraAdaptive,
    GaLore,
    fira_grad_clipping,
    fira_matrix,
    fira_no_limiter,
    fira_no_scaling,
    fira_only_scaling,
    make_optimizer,
    optimizer_methods,
)
from .sharded_state import distributed_state_dict, load_distributed_state_dict

__all__ = [
    "SubspaceAdamW", "NonFiniteGradientError", "is_projected", "param_groups", "layerwise",
    "LayerwiseOptimizer", "Fira", "GaLore", "AdaRankGrad", "FiraAdaptive", "APOLLO", "APOLLO_Mini", "FRUGAL", "LDAdam",
    "fira_matrix", "fira_no_scaling", "fira_no_limiter", "fira_grad_clipping", "fira_only_scaling", "PRESETS",
    "make_optimizer", "optimizer_methods", "distributed_state_dict", "load_distributed_state_dict",
]
