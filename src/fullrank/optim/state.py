"""The optimizer state's schema: every key a parameter's state may hold, who writes it, its shape and
dtype, and the checks a loaded state must pass. The engine and its units read and write state only
through these names.

Projected matrix (m×n at rank r, side from ``proj_type``)::

    step             int     optimizer steps taken on this matrix (``capturable=True``: 0-d fp32 on the device)
    adam_step        int     steps since Adam's moments were last reset (bias correction; likewise)
    exp_avg          r×n, m×r or r×r, param dtype      Adam's first moment of R
    exp_avg_sq       same                              Adam's second moment of R
    proj_left        m×r, param dtype   P (left and two-sided projections)
    proj_right       r×n, param dtype   Q (right and two-sided projections)
    proj_seed        int     APOLLO's seed of a Gaussian P, stored instead of P (``random_proj.py``)
    residual_norm    0-d, ≥ fp32   the limiter's kept ‖S_{t−1}‖ (``limiter.py``)
    captured_energy  0-d, ≥ fp32   moving average of ‖R‖²/‖G‖² (convergence trigger, ``refresh.py``)
    last_refresh     int     step of the last refresh (convergence trigger)

Plain parameter: ``step`` (int, or 0-d fp32 on the device as torch's capturable AdamW keeps it),
``exp_avg``, ``exp_avg_sq`` (param's shape and dtype; 8-bit as above).

Memory per projected matrix: 2·r·max(m, n) + r·min(m, n) elements for ``std`` (moments on the
larger side, P on the smaller), two scalars, and no more.
"""
from __future__ import annotations

import torch

STEP, ADAM_STEP = "step", "adam_step"
COUNTER_KEYS = (STEP, ADAM_STEP)  # ints, or 0-d device tensors under capturable=True
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX = "exp_avg_absmax", "exp_avg_sq_absmax"  # 8-bit moments (``moments.py``)
PROJ_LEFT, PROJ_RIGHT, PROJ_SEED = "proj_left", "proj_right", "proj_seed"
RESIDUAL_NORM = "residual_norm"
CAPTURED_ENERGY, LAST_REFRESH = "captured_energy", "last_refresh"

# State tensors whose dtype is their own, not the parameter's: load_state_dict keeps it (the scalars
# are ≥ fp32; 8-bit moments are uint8 with fp32 block maxima).
OWN_DTYPE_KEYS = (RESIDUAL_NORM, CAPTURED_ENERGY, EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX)


def keeps_own_dtype(key: str, value) -> bool:
    """Whether a saved state value keeps its dtype on load (see ``OWN_DTYPE_KEYS``; uint8 moments)."""
    return key in OWN_DTYPE_KEYS or (isinstance(value, torch.Tensor) and value.dtype == torch.uint8)


def init_projected(state: dict, param: torch.Tensor, norm_dtype: torch.dtype) -> None:
    """Counters and the limiter's norm; moments and P are written at the first refresh."""
    state[STEP] = 0
    state[ADAM_STEP] = 0
    state[RESIDUAL_NORM] = torch.zeros((), dtype=norm_dtype, device=param.device)


def new_moments(state: dict, shape: torch.Size, like: torch.Tensor) -> None:
    state[EXP_AVG] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    state[EXP_AVG_SQ] = torch.zeros(shape, dtype=like.dtype, device=like.device)


def validate_projected_state(state: dict, param: torch.Tensor, name: str, group: dict, shard=None) -> None:
    """Loaded projection state must fit the parameter and the group's rank: the rank itself for a
    fixed-rank group, any rank in [min_rank, max_rank] for an adaptive one (catches a resume from
    another configuration). ``shard`` (FSDP2, ``sharding.RowShard``): the state holds this rank's
    rows of P and its share of the moments (``sharding.py``)."""
    from .projector import projection_side  # (these units import the keys above)
    from .random_proj import stores_seed_only
    from .rank import rank_bounds

    from .sharding import chunk_span

    m, n = param.shape
    low, high = rank_bounds(group, (m, n))
    side = projection_side(group["proj_type"], (m, n))
    rows_here = m if shard is None else shard.rows  # rows of G (and P) this process holds
    cols_here = n if shard is None or side != "left" else chunk_span(n, shard.world, shard.rank)[1]
    at = f"rank {low}" if low == high else f"a rank in [{low}, {high}]"
    left, right, exp_avg = state.get(PROJ_LEFT), state.get(PROJ_RIGHT), state.get(EXP_AVG)
    seed = state.get(PROJ_SEED)
    if seed is not None:
        if not stores_seed_only(group):
            raise ValueError(f"optimizer state of {name!r} holds a projection seed: it was saved with "
                             "projector='random' and residual='only_scaling', this group does not use them")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"optimizer state of {name!r}: proj_seed must be an int, got {seed!r}")
        rows = group["rank"] if side in ("left", "both") else rows_here
        cols = group["rank"] if side in ("right", "both") else cols_here
        if exp_avg is not None and tuple(exp_avg.shape) != (rows, cols):
            raise ValueError(f"optimizer state of {name!r}: moments {tuple(exp_avg.shape)} do not match the projection "
                             f"({rows}, {cols}) at rank {group['rank']}")
        return
    if exp_avg is not None and left is None and right is None:
        raise ValueError(f"optimizer state of {name!r} has moments but no projection: it was saved by a plain group")
    if left is not None and (left.shape[0] != rows_here or not low <= left.shape[1] <= high):
        raise ValueError(
            f"optimizer state of {name!r}: proj_left {tuple(left.shape)} does not fit a {m}×{n} weight at {at}"
        )
    if right is not None and (right.shape[1] != n or not low <= right.shape[0] <= high):
        raise ValueError(
            f"optimizer state of {name!r}: proj_right {tuple(right.shape)} does not fit a {m}×{n} weight at {at}"
        )
    if left is not None and right is not None and left.shape[1] != right.shape[0]:
        raise ValueError(f"optimizer state of {name!r}: proj_left {tuple(left.shape)} and proj_right "
                         f"{tuple(right.shape)} do not match (different ranks)")
    if exp_avg is not None:
        rows = left.shape[1] if left is not None else rows_here
        cols = right.shape[0] if right is not None else cols_here
        exp_avg_sq = state.get(EXP_AVG_SQ)
        for moment in (exp_avg, exp_avg_sq):
            if moment is None or tuple(moment.shape) != (rows, cols):
                shown = None if moment is None else tuple(moment.shape)
                raise ValueError(
                    f"optimizer state of {name!r}: moments {shown} do not match the projection ({rows}, {cols})"
                )
