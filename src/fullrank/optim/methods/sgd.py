"""Plain SGD with momentum, the baseline of the Fira paper's Fig. 15 (preset ``sgd``)."""
from __future__ import annotations

import torch

SGD_MOMENTUM = 0.9


class SGDMomentum(torch.optim.SGD):
    """Preset "sgd" (paper Fig. 15): ``torch.optim.SGD`` with momentum (0.9 unless ``momentum``) on
    every parameter, with the presets' signature; Adam's betas and ε are not used, and the
    projection keys of the groups (rank, update_proj_gap, ...) are ignored."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 momentum: float = SGD_MOMENTUM, nesterov: bool = False, seed: int = 0):
        # ``seed`` is accepted because ``fullrank pretrain`` passes its seed to every preset; SGD draws nothing.
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
