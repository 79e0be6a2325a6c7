"""Named configurations of ``SubspaceAdamW``: Fira, GaLore, the paper's ablations (Table 4), and the
subspace dynamics of AdaRankGrad and APOLLO.

Each preset only chooses options; group keys still override them, as in any ``torch.optim``
optimizer (APOLLO-Mini's rank 1 excepted: it is what defines the method). Paper defaults: lr 0.01,
T = 200, α = 0.25 (models under 1B; 0.0625 for 1B and 7B), γ = 1.01.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..base.options import check_range
from ..core.optimizer import SubspaceAdamW
from .flora import Flora
from .frugal import FRUGAL
from .ldadam import LDAdam
from .scale import SCALE
from .sgd import SGDMomentum

PAPER_LR = 1e-2
PAPER_SCALE = 0.25
_SCALING_RULES = {"column": "scale_column", "matrix": "scale_matrix"}


class Fira(SubspaceAdamW):
    """Fira (Chen et al. 2024): GaLore plus the norm-scaled residual (eq. 8–11) under the
    norm-growth limiter (eq. 12). ``scaling`` is ``"column"`` (eq. 11, default) or ``"matrix"`` (eq. 10)."""

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 scaling: str = "column", scale: float = PAPER_SCALE, **options):
        if scaling not in _SCALING_RULES:
            raise ValueError(f"scaling must be one of {tuple(_SCALING_RULES)}, got {scaling!r}")
        options.setdefault("residual", _SCALING_RULES[scaling])
        options.setdefault("limiter", "norm_growth")
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, **options)


class GaLore(SubspaceAdamW):
    """GaLore (Zhao et al. 2024): Adam on R = PᵀG, update α·P·ψ(R); the residual is discarded."""

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 scale: float = PAPER_SCALE, **options):
        options.setdefault("residual", "discard")
        options.setdefault("limiter", "none")
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, **options)


ADAPTIVE_RANK_ENERGY = 0.9
ADAPTIVE_REFRESH_THRESHOLD = 0.5


class AdaRankGrad(SubspaceAdamW):
    """AdaRankGrad (Refael et al., ICLR 2025): Adam in a subspace whose rank follows the gradient's.

    At every refresh each matrix gets the smallest rank r keeping ``rank_energy`` η of ‖G‖²_F
    (bounded by ``min_rank`` and ``max_rank``, which defaults to the group's ``rank``: the state
    never exceeds GaLore's at that rank), found by the randomized range finder; a subspace is
    refreshed once Adam has converged inside it (``refresh_threshold``, ``update_proj_gap`` an upper
    bound), and the moments are rotated into the new subspace (``on_switch="reproject"``). The
    residual is discarded, as in GaLore. α (``scale``) defaults to GaLore's 0.25 (the paper's update
    has none, α = 1) so that, at equal lr, a comparison with GaLore isolates the subspace dynamics.
    """

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 rank_energy: float = ADAPTIVE_RANK_ENERGY,
                 refresh_threshold: float = ADAPTIVE_REFRESH_THRESHOLD, **options):
        options.setdefault("scale", PAPER_SCALE)
        options.setdefault("residual", "discard")
        options.setdefault("limiter", "none")
        options.setdefault("svd", "randomized")
        options.setdefault("on_switch", "reproject")
        super().__init__(params, lr, betas, eps, weight_decay, rank_energy=rank_energy,
                         refresh_threshold=refresh_threshold, **options)


class FiraAdaptive(Fira):
    """Fira's norm-scaled residual and norm-growth limiter on AdaRankGrad's adaptive subspace.

    The subspace as in :class:`AdaRankGrad` (adaptive rank, randomized range finder,
    convergence-triggered refresh, re-projected moments); the residual G − P·R outside it is added
    back as Fira does (eq. 8–12), so the update stays full-rank whatever the rank falls to.
    """

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 rank_energy: float = ADAPTIVE_RANK_ENERGY,
                 refresh_threshold: float = ADAPTIVE_REFRESH_THRESHOLD, **options):
        options.setdefault("svd", "randomized")
        options.setdefault("on_switch", "reproject")
        super().__init__(params, lr, betas, eps, weight_decay, rank_energy=rank_energy,
                         refresh_threshold=refresh_threshold, **options)


_APOLLO_SCALE_TYPES = {"channel": "column", "tensor": "tensor"}


class APOLLO(SubspaceAdamW):
    """APOLLO (Zhu et al., MLSys 2025, Algorithm 1): SGD with AdamW's scaling, estimated in a random subspace.

    A seeded Gaussian P (N(0, 1/r); by default regenerated from its seed, only the seed stored:
    ``projection_storage``, ``units/projectors.py``) gives
    R = Pᵀ·G; Adam's moments of R give ψ(R); the raw gradient is scaled by the channel-wise
    (``scale_type="channel"``: one factor per column, eq. 11) or tensor-wise (``"tensor"``) factor
    φ = ‖ψ(R)‖ / ‖R‖, limited by Fira's norm-growth limiter (γ = 1.01) and multiplied by
    √``apollo_scale``:  W ← W·(1 − ηλ) − η·√scale·c·φ∘G. Moments are kept when P is redrawn.

    ``apollo_scale`` is APOLLO's ``scale`` (named apart from the engine's α, which this rule does not
    use). The Adam convention is the engine's (``torch``); ``adam_convention="transformers"``
    reproduces the ``apollo-torch`` package to rounding (see ``units/adam.py`` for the difference).
    """

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 apollo_scale: float = 1.0, scale_type: str = "channel", **options):
        if scale_type not in _APOLLO_SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {tuple(_APOLLO_SCALE_TYPES)}, got {scale_type!r}")
        check_range("apollo_scale", apollo_scale, 0.0, math.inf, low_open=True)
        options.setdefault("projector", "random")
        options.setdefault("residual", "only_scaling")
        options.setdefault("limiter", "norm_growth")
        options.setdefault("on_switch", "keep")
        options.setdefault("scaling_granularity", _APOLLO_SCALE_TYPES[scale_type])
        options.setdefault("scaling_multiplier", math.sqrt(apollo_scale))
        super().__init__(params, lr, betas, eps, weight_decay, **options)


APOLLO_MINI_SCALE = 128.0


class APOLLO_Mini(APOLLO):  # noqa: N801 (the method's published name)
    """APOLLO-Mini: APOLLO at rank 1 with the tensor-wise factor and scale 128 (√128 ≈ 11.3 on the update).

    Every projected group is run at ``rank`` (1 by default) whatever rank it carries: the rank
    defines the method, and its state is 2·max(m, n) numbers per matrix plus one seed.
    """

    def __init__(self, params, lr=PAPER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 apollo_scale: float = APOLLO_MINI_SCALE, scale_type: str = "tensor", **options):
        rank = options.pop("rank", 1)
        check_range("rank", rank, 1, math.inf, integer=True)
        if not isinstance(params, torch.Tensor):
            params = [dict(g, rank=rank) if isinstance(g, dict) and g.get("rank") is not None else g for g in params]
        super().__init__(params, lr, betas, eps, weight_decay, apollo_scale=apollo_scale,
                         scale_type=scale_type, **options)


@dataclass(frozen=True)
class Preset:
    """A named configuration as data: an optimizer class and the options it fixes (a caller's options
    override them). Called like the class: ``fira_matrix(params, lr=1e-2)``."""

    base: type
    doc: str
    fixed: dict = field(default_factory=dict)

    def __call__(self, params, **options) -> torch.optim.Optimizer:
        return self.base(params, **{**self.fixed, **options})

    @property
    def __doc__(self) -> str:  # noqa: D105 (the preset's own description)
        return self.doc


def _preset(cls: type, doc: str, **fixed) -> Preset:
    return Preset(cls, doc, fixed)


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
fira_gradient_shrink = _preset(
    Fira, "Fira with the rebuttal's gradient shrink (Table r10) instead of the norm-growth limiter: "
    "‖S_t‖ ← a·‖S_t‖ + (1 − a)·‖S_{t−1}‖, a = ``limiter_alpha`` (0.5 unless given).",
    limiter="gradient_shrink",
)
fira_tensor_scaling = _preset(
    Fira, "Fira with the rebuttal's tensor-wise scaling (Table r10) instead of the limiter: S_t ← a·S_t, "
    "a = ``limiter_alpha`` (0.5 unless given).",
    limiter="tensor_scaling",
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
    "fira_gradient_shrink": fira_gradient_shrink,
    "fira_tensor_scaling": fira_tensor_scaling,
    "fira_only_scaling": fira_only_scaling,
    "adarankgrad": AdaRankGrad,
    "fira_adaptive": FiraAdaptive,
    "apollo": APOLLO,
    "apollo_mini": APOLLO_Mini,
    "flora": Flora,  # rebuttal Tables r6/r7 baseline (Hao et al. 2024)
    "sgd": SGDMomentum,  # paper Fig. 15 baseline
    "scale": SCALE,  # Glentis et al. 2025 (arXiv 2506.16659)
    "frugal": FRUGAL,  # Zmushko et al. 2025 (methods/frugal.py)
    "ldadam": LDAdam,  # Robert et al. 2025, from the engine's units (methods/ldadam.py)
}

_ADAMW_KEYS = ("params", "param_names", "lr", "betas", "eps", "weight_decay")


def _adamw(param_groups, lr, betas, eps, weight_decay, **options) -> torch.optim.AdamW:
    """torch.optim.AdamW on every parameter of the groups (projection options dropped)."""
    if isinstance(param_groups, (list, tuple)) and param_groups and isinstance(param_groups[0], dict):
        param_groups = [{k: v for k, v in g.items() if k in _ADAMW_KEYS} for g in param_groups]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def _adamw8bit(param_groups, lr, betas, eps, weight_decay, **options) -> SubspaceAdamW:
    """AdamW with blockwise 8-bit moments on every parameter of the groups (projection options
    dropped): the engine's plain groups with ``states="8bit"``, bitsandbytes' ``AdamW8bit`` update
    (same quantizer, block size and maps), which also steps layer-wise and under FakeTensorMode."""
    if isinstance(param_groups, (list, tuple)) and param_groups and isinstance(param_groups[0], dict):
        param_groups = [{k: v for k, v in g.items() if k in _ADAMW_KEYS} for g in param_groups]
    return SubspaceAdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, states="8bit",
                         **options)


# Presets that are not SubspaceAdamW keep their own state and take no ``states`` option.
_OWN_STATE_METHODS = ("flora", "sgd")


def optimizer_methods() -> tuple[str, ...]:
    """Names accepted by :func:`make_optimizer`."""
    return ("adamw", "adamw8bit", *PRESETS)


def make_optimizer(method: str, param_groups, *, lr: float = PAPER_LR, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8, **options) -> torch.optim.Optimizer:
    """Build the optimizer named ``method`` (``"adamw"``, ``"adamw8bit"`` or a preset) over
    ``param_groups``. ``states="8bit"`` gives every SubspaceAdamW preset blockwise 8-bit moments;
    with ``"adamw"`` it is ``"adamw8bit"``."""
    states = options.pop("states", None)
    if method == "adamw" and states == "8bit":
        method = "adamw8bit"
    native = "8bit" if method == "adamw8bit" else "32bit"
    if method in ("adamw", "adamw8bit", *_OWN_STATE_METHODS) and states not in (None, native):
        allowed = "'8bit'" if method == "adamw8bit" else "'32bit' (and '8bit' for adamw)"
        raise ValueError(f"states={states!r} is not available for method {method!r}: it allows states={allowed}")
    if method == "adamw":
        return _adamw(param_groups, lr, betas, eps, weight_decay, **options)
    if method == "adamw8bit":
        return _adamw8bit(param_groups, lr, betas, eps, weight_decay, **options)
    if method not in PRESETS:
        raise ValueError(f"method must be one of {optimizer_methods()}, got {method!r}")
    if method not in _OWN_STATE_METHODS and states is not None:
        options["states"] = states
    return PRESETS[method](param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
