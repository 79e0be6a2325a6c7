"""FRUGAL (Zmushko, Beznosikov, Takáč & Horváth, ICML 2025, arXiv 2411.07837): Adam in a ρ-fraction
subspace and state-free signSGD on the rest of the gradient, so the update is full-rank.

The paper's Algorithm 1 (FRUGAL(state-full, state-free)) with Adam as the state-full and signSGD as
the state-free optimizer, for an m×n weight with an orthonormal projection P (left; a right one
acts on the other side) refreshed every T steps::

    every T steps:  P ← top-r singular vectors of G (or a random semi-orthogonal P);
                    Adam's moments and step count are reset          (official ``reset_statistics=True``)
    R   = Pᵀ·G                                                       the state-full part
    S   = G − P·R                                                    the state-free part
    W  ← W·(1 − ηλ) − η·α·P·ψ(R) − η·α·s·sign(S)                     ψ = Adam's direction of R

α is the official code's ``proj_params_lr_scale`` (the engine's ``scale``, 1 in all of the paper's
runs), s its ``inactive_lr_scale`` (``state_free_lr_scale`` here: 1 for pre-training, 0.1 for
fine-tuning), and the state-free learning rate is η·α·s, as the official code computes it. The
decay is η·λ, not scaled by α. ρ (``density``) is the fraction of the projected dimension kept:
r = round(ρ·d) with d = n for a right projection, m for a left one (min(m, n) under GaLore's
``proj_type="std"``), as the official ``GaLoreProjector`` takes it.

In the engine this is one update rule, ``residual="frugal"`` (:class:`SignResidual`): the residual
term is ``Contribution.explicit`` = sign(G − P·R) built from ``Bucket.residual(1.0)``, weighted by
α·s, with ``residual_sq`` = ‖sign(S)‖² (the number of non-zero entries) so the limiters and the
residual statistics see it; FRUGAL itself uses no limiter. The rest is configuration
(:class:`FRUGAL`): ``on_switch="reset"``, ``limiter="none"``, ``scale=1``, T = 200.

Projections: the official ``GaLoreProjector``'s three are covered — "svd" (the default), "random"
(a random semi-orthogonal P: ``projector="random"``, GoLore's Haar basis) and "randperm" (r random
coordinates of the projected side, i.e. whole rows or columns of G: ``projector="random_columns"``,
:class:`RandomColumns`, registered here, an orthonormal 0/1 P drawn from the group's seed). Not
covered (seams the engine lacks): RandK on single entries (``CoordOptimizer`` with ``randk``: not a
matrix product P·R) and the BAdam-like blockwise split (``BlockOptimizer``, which the official
``frugal`` optimizer name selects: a random ρ-fraction of the *matrices* gets AdamW, the others
signSGD, redrawn every T steps — a per-matrix state-full/state-free choice with state only for the
active ones, which a group's single rank cannot express).

FSDP2: the rule is not ``shard_aware`` (a left projection's R is sharded by columns on each rank
while G is sharded by rows, so G − P·R is not formed locally); the engine refuses it on sharded
parameters with a ValueError naming the rule.
"""
from __future__ import annotations

import torch

from ..base.counters import STEP
from ..base.norms import norm_dtype
from ..base.options import Option, check_range, number
from ..base.seeds import projection_seed
from ..core.optimizer import SubspaceAdamW
from ..units.projection import projection_side
from ..units.projectors import PROJECTOR_REGISTRY, RandomProjector
from ..units.rules import Bucket, Contribution, Rule, register_rule

STATE_FREE_LR_SCALE = Option(1.0, number(0.0),
                             "FRUGAL: the state-free signSGD's learning rate relative to Adam's (official "
                             "inactive_lr_scale; 1 for pre-training, 0.1 for fine-tuning)")


class SignResidual(Rule):
    """``residual="frugal"``: update = α·P·ψ(R) + α·s·sign(G − P·R) (FRUGAL, Algorithm 1 with
    Adam and signSGD). The sign is the residual itself (``Contribution.explicit``), φ = 1."""

    name = "frugal"
    shard_aware = False  # the residual is formed from whole rows of P·R: see the module docstring
    options = {"state_free_lr_scale": STATE_FREE_LR_SCALE}

    def contribution(self, bucket: Bucket, values) -> Contribution:
        sign = bucket.residual(1.0).sign_()
        dtype = norm_dtype(sign.dtype)
        ones = torch.ones((sign.shape[0], 1, 1), dtype=dtype, device=sign.device)
        count = torch.count_nonzero(sign, dim=(-2, -1)).to(dtype)  # ‖sign(S)‖² = number of non-zero entries
        return Contribution(values.scale, phi=ones, kappa=0.0, residual_sq=count,
                            weight=values.scale * values.state_free_lr_scale, explicit=sign)


register_rule(SignResidual())


def random_columns(shape: tuple[int, int], side: str, rank: int, seed: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(proj_left, proj_right) selecting ``rank`` random coordinates of the projected side: P (m×r)
    with P[i_k, k] = 1 (R = PᵀG: r rows of G), Q (r×n) with Q[k, j_k] = 1 (R = G·Qᵀ: r columns);
    orthonormal, each drawn by ``torch.randperm`` from a generator seeded with ``seed``."""
    m, n = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def pick(size: int) -> torch.Tensor:
        chosen = torch.randperm(size, generator=generator)[:rank].to(device)
        basis = torch.zeros((size, rank), dtype=dtype, device=device)
        basis[chosen, torch.arange(rank, device=device)] = 1
        return basis

    left = pick(m) if side in ("left", "both") else None
    right = pick(n).T.contiguous() if side in ("right", "both") else None
    return left, right


class RandomColumns(RandomProjector):
    """``projector="random_columns"``: FRUGAL's "randperm" projection — r random rows (left) or
    columns (right) of G are state-full, redrawn at every refresh from the group's ``seed``, the
    parameter's ordinal and the step (the same on every rank and after a resume)."""

    name = "random_columns"
    fitted = False

    def draws_gaussian(self, values) -> bool:
        return False

    def draw(self, values, pairs, shape, side) -> list:
        out = []
        for item, state in pairs:
            seed = projection_seed(values.seed, item.ordinal, state[STEP])
            left, right = random_columns(shape, side, values.rank, seed, item.grad.device, item.grad.dtype)
            out.append((item, state, left, right, None))
        return out


PROJECTOR_REGISTRY.register(RandomColumns())


def frugal_rank(shape: tuple[int, int], density: float, proj_type: str = "std") -> int:
    """r = round(ρ·d), d the projected dimension (n for a right projection, m for a left one,
    min(m, n) for both sides), at least 1 (the engine's rank is ≥ 1; the official code would keep
    no state-full part at r = 0)."""
    m, n = shape
    side = projection_side(proj_type, (m, n))
    dim = {"right": n, "left": m, "both": min(m, n)}[side]
    return max(1, min(dim, round(density * dim)))


def _split_by_density(params, density: float, proj_type_default: str):
    """Every projected group split into one group per rank that ρ gives its matrices (same options,
    the parameters and their names in order within each); other groups unchanged."""
    if isinstance(params, torch.Tensor):
        return params
    params = list(params)
    out = []
    for group in params:
        if not isinstance(group, dict) or group.get("rank") is None:
            out.append(group)
            continue
        proj_type = group.get("proj_type", proj_type_default)
        names = group.get("param_names")
        members = list(group["params"])
        by_rank: dict[int, list[int]] = {}
        for k, param in enumerate(members):
            rank = frugal_rank(tuple(param.shape), density, proj_type) if param.dim() == 2 else group["rank"]
            by_rank.setdefault(rank, []).append(k)
        for rank, positions in by_rank.items():
            split = dict(group, params=[members[k] for k in positions], rank=rank)
            if names is not None and len(names) == len(members):
                split["param_names"] = [names[k] for k in positions]
            out.append(split)
    return out


FRUGAL_GAP = 200


class FRUGAL(SubspaceAdamW):
    """FRUGAL (arXiv 2411.07837, Algorithm 1): Adam in the top-r subspace, signSGD on the residual.

    Args (beside SubspaceAdamW's):
        density: ρ. When given, each projected group's matrices get r = round(ρ·d) (d the projected
            dimension, min(m, n) under ``proj_type="std"``; ``frugal_rank``) and the group is split
            into one group per distinct r. None (default): the groups' ``rank`` is used as given, and
            ρ = rank / min(m, n). The paper's default is ρ = 0.25.
        state_free_lr_scale: s, the signSGD learning rate relative to Adam's (official
            ``inactive_lr_scale``: 1 for pre-training, 0.1 for fine-tuning).
        scale: α (official ``proj_params_lr_scale``, 1 in the paper's runs); multiplies both parts.

    Defaults as the official code: T = 200 (``update_proj_gap``), moments reset when P changes
    (``on_switch="reset"``), no limiter, exact SVD; ``projector="random"`` gives its random
    semi-orthogonal projection and ``projector="random_columns"`` its random coordinates ("randperm").
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 density: float | None = None, state_free_lr_scale: float = 1.0, **options):
        if density is not None:
            check_range("density", density, 0.0, 1.0, low_open=True)
            params = _split_by_density(params, density, options.get("proj_type", "std"))
        options.setdefault("scale", 1.0)
        options.setdefault("residual", "frugal")
        options.setdefault("limiter", "none")
        options.setdefault("on_switch", "reset")
        options.setdefault("update_proj_gap", FRUGAL_GAP)
        super().__init__(params, lr, betas, eps, weight_decay, state_free_lr_scale=state_free_lr_scale, **options)


__all__ = ["FRUGAL", "SignResidual", "RandomColumns", "frugal_rank", "random_columns", "STATE_FREE_LR_SCALE"]
