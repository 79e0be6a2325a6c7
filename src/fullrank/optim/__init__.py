"""The optimizer engine: projector × inner Adam × residual rule × limiter, and its presets.

``__all__`` here is the one list of what fullrank exports from its optimizers (``fullrank``
re-exports it).
"""
from .engine import NonFiniteGradientError, SubspaceAdamW, is_projected
from .frugal import FRUGAL
from .groups import param_groups
from .layerwise import LayerwiseOptimizer, layerwise
from .ldadam import LDAdam
from .presets import (
    APOLLO,
    PRESETS,
    APOLLO_Mini,
    AdaRankGrad,
    Fira,
    FiraAdaptive,
    GaLore,
    Preset,
    fira_grad_clipping,
    fira_gradient_shrink,
    fira_matrix,
    fira_no_limiter,
    fira_no_scaling,
    fira_only_scaling,
    fira_tensor_scaling,
    make_optimizer,
    optimizer_methods,
)
from .scale import SCALE
from .sharded_state import distributed_state_dict, load_distributed_state_dict

__all__ = [
    "SubspaceAdamW", "NonFiniteGradientError", "is_projected", "param_groups", "layerwise", "LayerwiseOptimizer",
    "Fira", "GaLore", "AdaRankGrad", "FiraAdaptive", "APOLLO", "APOLLO_Mini", "SCALE", "FRUGAL", "LDAdam", "Preset", "PRESETS",
    "fira_matrix", "fira_no_scaling", "fira_no_limiter", "fira_grad_clipping", "fira_gradient_shrink",
    "fira_tensor_scaling", "fira_only_scaling", "make_optimizer", "optimizer_methods",
    "distributed_state_dict", "load_distributed_state_dict",
]
