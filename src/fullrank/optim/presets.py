"""Named configurations of ``SubspaceAdamW``: Fira, GaLore and the paper's ablations (Table 4).

Each preset only chooses options; group keys still override them, as in any ``torch.optim``
optimizer. Paper defaults: lr 0.01, T = 200, α = 0.25 (models under 1B; 0.0625 for 1B and 7B),
γ = 1.01.
"""
from __future__ import annotations

from typing import Callable

import torch

from .engine import SubspaceAdamW

PAPER_LR = 1e-2
PAPER_SCALE = 0.25
_SCALING_RULES = {"column": "scale_column", "matrix": "scale_matrix"}


class Fira(SubspaceAdamW):
    """Fira (Chen et al. 2024): GaLore plus the norm-scaled residual (eq. 8–11) under the
    norm-growth limiter (eq. 12). ``scaling`` is ``"column"`` (eq. 11, default) or ``"matrix"`` (eq. 10)."""

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 scaling: str = "column", gamma: float = 1.01, scale: float = PAPER_SCALE, **options):
        if scaling not in _SCALING_RULES:
            raise ValueError(f"scaling must be one of {tuple(_SCALING_RULES)}, got {scaling!r}")
        options.setdefault("residual", _SCALING_RULES[scaling])
        options.setdefault("limiter", "norm_growth")
        super().__init__(params, lr, betas, eps, weight_decay, gamma=gamma, scale=scale, **options)


class GaLore(SubspaceAdamW):
    """GaLore (Zhao et al. 2024): Adam on R = PᵀG, update α·P·ψ(R); the residual is discarded."""

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 scale: float = PAPER_SCALE, **options):
        options.setdefault("residual", "discard")
        options.setdefault("limiter", "none")
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, **options)


def _preset(cls: type, doc: str, **fixed) -> Callable[..., SubspaceAdamW]:
    def make(params, **options) -> SubspaceAdamW:
        return cls(params, **{**fixed, **options})

    make.__doc__ = doc
    return make


fira_matrix = _preset(Fira, "Fira-matrix: matrix-level φ (eq. 10) instead of column-level.", scaling="matrix")
fira_no_scaling = _preset(
    SubspaceAdamW, "Fira w/o scaling = GaLore-add: the residual G − P·R added unscaled, no limiter.",
    lr=PAPER_LR, scale=PAPER_SCALE, residual="add", limiter="none",
)
fira_no_limiter = _preset(Fira, "Fira w/o limiter: column-level φ, no norm-growth limiter.", limiter="none")
fira_grad_clipping = _preset(
    Fira, "Fira with absolute norm clipping of S (threshold ``clip_threshold``) instead of the limiter.",
    limiter="clip",
)
fira_only_scaling = _preset(
    Fira, "Fira-only-scaling (review discussion): W ← W − η·c·φ(R)∘G with column-level φ and the limiter.",
    residual="only_scaling",
)

PRESETS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore": GaLore,
    "fira": Fira,
    "fira_matrix": fira_matrix,
    "fira_no_scaling": fira_no_scaling,
    "fira_no_limiter": fira_no_limiter,
    "fira_grad_clipping": fira_grad_clipping,
    "fira_only_scaling": fira_only_scaling,
}

_ADAMW_KEYS = ("params", "param_names", "lr", "betas", "eps", "weight_decay")


def _adamw(param_groups, lr, betas, eps, weight_decay, **options) -> torch.optim.AdamW:
    """torch.optim.AdamW on every parameter of the groups (projection options dropped)."""
    if isinstance(param_groups, (list, tuple)) and param_groups and isinstance(param_groups[0], dict):
        param_groups = [{k: v for k, v in g.items() if k in _ADAMW_KEYS} for g in param_groups]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def optimizer_methods() -> tuple[str, ...]:
    """Names accepted by :func:`make_optimizer`."""
    return ("adamw", *PRESETS)


def make_optimizer(method: str, param_groups, *, lr: float = PAPER_LR, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8, **options) -> torch.optim.Optimizer:
    """Build the optimizer named ``method`` (``"adamw"`` or a preset) over ``param_groups``."""
    if method == "adamw":
        return _adamw(param_groups, lr, betas, eps, weight_decay, **options)
    if method not in PRESETS:
        raise ValueError(f"method must be one of {optimizer_methods()}, got {method!r}")
    return PRESETS[method](param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
