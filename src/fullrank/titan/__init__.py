"""fullrank inside torchtitan (PyTorch's pre-training platform: FSDP2, DCP, float8, …).

* :class:`SubspaceOptimizersContainer` — torchtitan's ``OptimizersContainer`` resolving every fullrank
  method (``fira``, ``galore``, ``apollo``, …) by ``optimizer_name``; :func:`subspace_optimizer` builds
  its config (the transformer's linear weights projected, the rest plain AdamW).
* :class:`CheckpointManager` — torchtitan's DCP checkpointer, loading fullrank's optimizer state.
* ``fullrank.titan.config_registry`` — ``torchrun … -m torchtitan.train --module fullrank.titan
  --config llama3_debugmodel_fira`` (or ``llama3_8b_fira``).

Needs torchtitan 0.3.0: ``pip install "fullrank[titan]"`` (``import fullrank`` never imports it).
"""
try:
    import torchtitan.components.checkpoint  # noqa: F401
    import torchtitan.components.optimizer  # noqa: F401
except ImportError as error:
    missing = f" (missing: {error.name})" if getattr(error, "name", None) else ""
    raise ImportError(f'fullrank.titan needs torchtitan 0.3.0 and its dependencies{missing}: '
                      f'pip install "fullrank[titan]"') from error

from .checkpoint import CheckpointManager
from .container import LLAMA3_PROJECTED_PATTERN, SubspaceOptimizersContainer, subspace_optimizer

__all__ = ["CheckpointManager", "LLAMA3_PROJECTED_PATTERN", "SubspaceOptimizersContainer", "subspace_optimizer"]
