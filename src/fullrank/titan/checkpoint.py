"""torchtitan's DCP checkpointer, loading fullrank's optimizer state through fullrank's own layout.

Saving needs nothing new: torchtitan's ``CheckpointManager`` hands every stateful object to
``dcp.save``, and ``SubspaceOptimizersContainer.state_dict`` returns fullrank's layout
(``fullrank.optim.distributed_state_dict``). Loading does: DCP fills a template that the container
would have to give before the checkpoint is read, but the shapes of fullrank's state (a projection of
r×n or m×r, an adaptive rank per matrix, moments in the projected space, none at all before the first
step) are only known from the checkpoint's metadata. This manager loads everything else as torchtitan
does, then lets the container read its state from the checkpoint folder
(``fullrank.optim.load_distributed_state_dict``), on any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.components.checkpoint import OPTIMIZER
from torchtitan.components.checkpoint import CheckpointManager as TorchtitanCheckpointManager

from .container import SubspaceOptimizersContainer

__all__ = ["CheckpointManager"]


class CheckpointManager(TorchtitanCheckpointManager):
    """torchtitan's ``CheckpointManager`` (same options, folders, intervals, async modes and
    retention) whose loads read fullrank's optimizer state with the shapes the checkpoint holds."""

    @dataclass(kw_only=True, slots=True)
    class Config(TorchtitanCheckpointManager.Config):
        pass

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        optimizers = state_dict.get(OPTIMIZER)
        if from_hf or not isinstance(optimizers, SubspaceOptimizersContainer):
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
            return
        rest = {key: value for key, value in state_dict.items() if key != OPTIMIZER}
        super().dcp_load(rest, checkpoint_id, from_hf, from_quantized)
        optimizers.load_checkpoint(checkpoint_id, key=OPTIMIZER)
