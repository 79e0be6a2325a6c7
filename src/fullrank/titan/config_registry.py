"""torchtitan Trainer configs with a fullrank optimizer, for ``torchtitan.train``'s config registry::

    torchrun --nproc_per_node 8 -m torchtitan.train --module fullrank.titan --config llama3_8b_fira

(``--module fullrank.titan`` makes torchtitan's ``ConfigManager`` import this module.) Each config is
torchtitan's own Llama 3 config with two components swapped: the optimizer
(:class:`~fullrank.titan.SubspaceOptimizersContainer`, Fira on the transformer's linear weights, AdamW on
the rest) and the checkpointer (:class:`~fullrank.titan.CheckpointManager`, which loads fullrank's
state). Every other field, and every command-line override, is torchtitan's; the optimizer's group
options are overridden as ``--optimizer.param-groups.0.optimizer-kwargs.rank 128`` (group 0 is the
projected group, 1 the plain one).
"""
from __future__ import annotations

from dataclasses import fields

from torchtitan.models.llama3 import config_registry as llama3_registry
from torchtitan.trainer import Trainer

from .checkpoint import CheckpointManager
from .container import subspace_optimizer

__all__ = ["llama3_debugmodel_fira", "llama3_8b_fira"]

# Fira (Chen et al. 2024) pre-training settings: lr 0.01, T = 200 steps between subspace refreshes,
# γ = 1.01 for the norm-growth limiter (eq. 12); α = 0.25 below 1B parameters, 0.0625 from 1B on;
# rank 1024 for the 7B model (Table 2), which fits Llama 3 8B's shapes (4096 × 14336, 1024 × 4096 …).
PAPER_LR = 1e-2
PAPER_UPDATE_PROJ_GAP = 200
PAPER_GAMMA = 1.01
PAPER_SCALE_SMALL = 0.25
PAPER_SCALE_LARGE = 0.0625
PAPER_RANK_7B = 1024
# torchtitan's debug model has d_model 256: rank d_model / 4, the rule of fullrank's tiny presets.
DEBUGMODEL_RANK = 64


def _fullrank_checkpointer(checkpoint) -> CheckpointManager.Config:
    """The same checkpoint options, built as fullrank's ``CheckpointManager``."""
    return CheckpointManager.Config(**{f.name: getattr(checkpoint, f.name) for f in fields(checkpoint) if f.init})


def _with_fira(config: Trainer.Config, rank: int, scale: float) -> Trainer.Config:
    """torchtitan's ``config`` with Fira (paper lr, T and γ; ``rank`` and α = ``scale``) and
    fullrank's checkpointer."""
    config.optimizer = subspace_optimizer("fira", lr=PAPER_LR, rank=rank, update_proj_gap=PAPER_UPDATE_PROJ_GAP,
                                          scale=scale, gamma=PAPER_GAMMA)
    config.checkpoint = _fullrank_checkpointer(config.checkpoint)
    return config


def llama3_debugmodel_fira() -> Trainer.Config:
    """torchtitan's ``llama3_debugmodel`` (6 layers, d_model 256, its test tokenizer and c4_test data)
    trained by Fira at rank 64, lr 0.01, T = 200, α = 0.25, γ = 1.01."""
    return _with_fira(llama3_registry.llama3_debugmodel(), DEBUGMODEL_RANK, PAPER_SCALE_SMALL)


def llama3_8b_fira() -> Trainer.Config:
    """torchtitan's ``llama3_8b`` trained by Fira with the paper's ≥ 1B settings: rank 1024, lr 0.01,
    T = 200, α = 0.0625, γ = 1.01."""
    return _with_fira(llama3_registry.llama3_8b(), PAPER_RANK_7B, PAPER_SCALE_LARGE)
