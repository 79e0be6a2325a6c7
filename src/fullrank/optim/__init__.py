"""The optimizer engine, in layers that only import downwards:

    base/         options and registries, norms, seeds, step counters, host reads, FSDP2 row shards
    units/        inner Adam, projection and projectors, SVD, rank, refresh schedule, switch, moment
                  stores, update rules, limiters, transforms, weight writers: each declares its
                  options and state
    core/         SubspaceAdamW and its one step path (plan, finiteness, refresh, buckets, compute, write)
    methods/      presets, FRUGAL, LDAdam, SCALE, Flora, SGD, param_groups
    distributed/  FSDP2's DCP state, the layer-wise mode

``__all__`` here is the one list of what fullrank exports from its optimizers (``fullrank``
re-exports it).
"""
from .base.module_paths import keep_earlier_paths
from .core.finiteness import NonFiniteGradientError
from .core.optimizer import SubspaceAdamW
from .core.plan import is_projected
from .distributed.checkpoint import distributed_state_dict, load_distributed_state_dict
from .distributed.layerwise import LayerwiseOptimizer, layerwise
from .methods.frugal import FRUGAL
from .methods.ldadam import LDAdam
from .methods.param_groups import param_groups
from .methods.presets import (
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
from .methods.scale import SCALE

__all__ = [
    "SubspaceAdamW", "NonFiniteGradientError", "is_projected", "param_groups", "layerwise", "LayerwiseOptimizer",
    "Fira", "GaLore", "AdaRankGrad", "FiraAdaptive", "APOLLO", "APOLLO_Mini", "SCALE", "FRUGAL", "LDAdam", "Preset", "PRESETS",
    "fira_matrix", "fira_no_scaling", "fira_no_limiter", "fira_grad_clipping", "fira_gradient_shrink",
    "fira_tensor_scaling", "fira_only_scaling", "make_optimizer", "optimizer_methods",
    "distributed_state_dict", "load_distributed_state_dict",
]

keep_earlier_paths(__name__, {  # pickles (class paths), the modules the documentation named, and imports from outside
    "engine": ("core.optimizer", "core.finiteness", "core.plan", "core.buckets"),
    "presets": ("methods.presets",), "layerwise": ("distributed.layerwise",), "frugal": ("methods.frugal",),
    "ldadam": ("methods.ldadam",), "scale": ("methods.scale",), "flora": ("methods.flora", "methods.sgd"),
    "groups": ("methods.param_groups",), "sharded_state": ("distributed.checkpoint",), "sharding": ("base.shards",),
    "state_bytes": ("core.state_bytes",), "components": ("base.options", "base.units"),
    "residual": ("units.rules", "base.norms"), "limiter": ("units.limiters",), "svd": ("units.svd",),
    "projectors": ("units.projectors",), "moments": ("units.moments",), "transforms": ("units.transforms",),
})
