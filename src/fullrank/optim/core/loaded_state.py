"""A loaded optimizer state, checked against its parameter and group and converted to this optimizer's
choices (where the moments live, where the counters live, APOLLO's P as a seed or a matrix).

The keys a parameter's state may hold are declared by their owners: the step counters
(``base/counters.py``), the moments (``units/moments.py``), P (``units/projectors.py``) and every
unit's own state (``base/units.py``: the limiter's kept norm, the trigger's energy, a rule's state,
error feedback's buffer). Memory per projected matrix: 2·r·max(m, n) + r·min(m, n) elements for
``std`` (moments on the larger side, P on the smaller), plus the units' scalars.
"""
from __future__ import annotations

import torch

from ..base import shards
from ..base.counters import COUNTER_KEYS
from ..units.moments import EXP_AVG, EXP_AVG_SQ
from ..units.projection import projection_side
from ..units.projectors import PROJ_LEFT, PROJ_RIGHT, PROJ_SEED
from ..units.rank import rank_bounds
from .group_options import unit_state_keys
from .plan import GroupPlan


def keeps_own_dtype(key: str, value) -> bool:
    """Whether a saved state value keeps its dtype on load: the units' declared state (≥ fp32
    scalars, 8-bit block maxima) and uint8 moments; torch casts the rest to the parameter's dtype."""
    return isinstance(value, torch.Tensor) and (key in unit_state_keys() or value.dtype == torch.uint8)


def validate_projected_state(state: dict, param: torch.Tensor, name: str, plan: GroupPlan, shard=None) -> None:
    """Loaded projection state must fit the parameter and the group's rank: the rank itself for a
    fixed-rank group, any rank in [min_rank, max_rank] for an adaptive one (catches a resume from
    another configuration). ``shard`` (FSDP2, ``shards.RowShard``): the state holds this rank's rows
    of P and its share of the moments (``base/shards.py``)."""
    values = plan.values
    m, n = param.shape
    side = projection_side(values.proj_type, (m, n))
    rows_here = m if shard is None else shard.rows  # rows of G (and P) this process holds
    cols_here = n if shard is None or side != "left" else shards.chunk_span(n, shard.world, shard.rank)[1]
    exp_avg = state.get(EXP_AVG)
    plan.units.projector.check_loaded(state, name, values)
    if state.get(PROJ_SEED) is not None:
        rows = values.rank if side in ("left", "both") else rows_here
        cols = values.rank if side in ("right", "both") else cols_here
        if exp_avg is not None and tuple(exp_avg.shape) != (rows, cols):
            raise ValueError(f"optimizer state of {name!r}: moments {tuple(exp_avg.shape)} do not match the projection "
                             f"({rows}, {cols}) at rank {values.rank}")
        return
    left, right = state.get(PROJ_LEFT), state.get(PROJ_RIGHT)
    if exp_avg is not None and left is None and right is None:
        raise ValueError(f"optimizer state of {name!r} has moments but no projection: it was saved by a plain group")
    _check_projection(left, right, (m, n, rows_here), name, values)
    if exp_avg is not None:
        rows = left.shape[1] if left is not None else rows_here
        cols = right.shape[0] if right is not None else cols_here
        for moment in (exp_avg, state.get(EXP_AVG_SQ)):
            if moment is None or tuple(moment.shape) != (rows, cols):
                shown = None if moment is None else tuple(moment.shape)
                raise ValueError(
                    f"optimizer state of {name!r}: moments {shown} do not match the projection ({rows}, {cols})"
                )


def _check_projection(left, right, sizes: tuple, name: str, values) -> None:
    """P (this process's rows) and Q fit an m×n weight at a rank the group allows, and each other."""
    m, n, rows_here = sizes
    low, high = rank_bounds(values, (m, n))
    at = f"rank {low}" if low == high else f"a rank in [{low}, {high}]"
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


def convert(plan: GroupPlan, state: dict, param: torch.Tensor, shard=None) -> None:
    """A checked state brought to this group's choices: moments to its store (``states``), APOLLO's
    seed to its P when the group stores P, and the counters to ints or, under ``capturable=True``,
    0-d fp32 device tensors."""
    side = None if plan.units is None else projection_side(plan.values.proj_type, tuple(param.shape))
    plan.store.adopt(state, param, shards.state_split(shard, side))
    if plan.units is not None:
        plan.units.projector.adopt(state, plan.values, param, shard)
    for key in COUNTER_KEYS:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and not plan.values.capturable:
            state[key] = int(value.item())
        elif value is not None and plan.values.capturable:
            state[key] = torch.as_tensor(value, dtype=torch.float32).to(shards.local(param).device)
