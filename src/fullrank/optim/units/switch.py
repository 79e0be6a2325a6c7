"""What Adam's moments do when the projection changes (``on_switch``).

* ``keep``       GaLore's (and APOLLO's) behaviour: the moments stay as they are, now read in the new
                 basis. If the low-rank shape changed (adaptive rank) they cannot be kept and are
                 reset as with ``reset``.
* ``reproject``  AdaRankGrad's (Refael et al., ICLR 2025, moments carried across subspaces): rotate
                 the moments into the new subspace with Q = P_newᵀ·P_old (right projections:
                 Q = Q_old·Q_newᵀ on the other side)::

                     M_new = Q·M_old              (exact for the first moment's linear map)
                     V_new = (Q∘Q)·V_old          (second moment)

                 Q is r_new×r_old, so the rank may change at the switch (adaptive rank). M_new is
                 what M would be had every past gradient been projected on P_new through P_old
                 (R_new = Q·R_old for a gradient in span(P_old)): exact when the new subspace is the
                 old one rotated, or a part of it. The second moment is not a linear function of
                 the gradients; AdaRankGrad rotates it like M, which can make it negative. The map
                 here is the variance of Q·r for a low-rank gradient r with independent zero-mean
                 coordinates of variances V_old: non-negative, exact when Q is a signed (partial)
                 permutation (the same basis vectors re-ordered, flipped or dropped), it preserves
                 the total Σ_i V_i of each column under any rotation (Q's columns are unit
                 vectors), and it never invents curvature outside what the old subspace had seen:
                 directions new to the subspace start at M = V = 0, as Adam starts any coordinate.
* ``ldadam``     LDAdam's projection-aware transfer (Robert et al., arXiv 2410.16103, Algorithm 1):
                 M_new = Q·M as ``reproject``, and the second moment carried as a variance around the
                 rotated mean, with M̂ = M/b₁, b₁ = 1 − β₁^s, b₂ = 1 − β₂^s (s Adam steps so far)::

                     V_new = b₂·|(Q∘Q)·(V/b₂ − M̂²) + (Q·M̂)²|

                 equal to ``reproject`` when Q is a signed permutation (``tests/test_ldadam.py``).
* ``reset``      zero moments and restart Adam's bias correction.

The switch allocates new tensors at the new shape (the matmuls do), so no moment is a view of a
bigger storage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.counters import ADAM_STEP
from ..base.options import Option, choice, flag
from ..base.units import Unit, declare_policy
from .moments import EXP_AVG, MomentStore
from .moments import low_shape as low_shape_of
from .projection import project_back
from .projectors import PROJ_LEFT, PROJ_RIGHT

ON_SWITCH = ("keep", "reproject", "ldadam", "reset")


class SwitchPolicy(Unit):
    """What a new subspace does to Adam's moments (``on_switch``) and to the limiter's kept norm."""

    name = "switch_policy"
    options = {
        "on_switch": Option("keep", choice(*ON_SWITCH), "Adam's moments when P changes: keep, reproject or reset"),
        "reset_limiter_on_switch": Option(False, flag, "forget the limiter's previous norm when P changes"),
    }


SWITCH_POLICY = declare_policy(SwitchPolicy())
OPTIONS = SWITCH_POLICY.options


@dataclass(frozen=True)
class MomentCarry:
    """How the moments are carried: ``store`` where they live (``moments.py``), ``like`` a tensor of the
    parameter's dtype and device (new moments; default the moments'), Adam's ``betas`` (``ldadam``),
    ``rotations`` (Q_left, Q_right) when the caller computed them (a sharded P: the sum over the
    ranks' rows), and ``split``, the (dim, whole size) a sharded rank's moments are cut from
    (``moments.whole_numel``)."""

    store: MomentStore | None = None
    like: torch.Tensor | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    rotations: tuple | None = None
    split: tuple[int, int] | None = None


def _rotations(
    old_left: torch.Tensor | None,
    old_right: torch.Tensor | None,
    new_left: torch.Tensor | None,
    new_right: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Q_left, Q_right) so that R_new ≈ Q_left·R_old·Q_right for the same gradient."""
    q_left = new_left.T @ old_left if new_left is not None else None
    q_right = old_right @ new_right.T if new_right is not None else None
    return q_left, q_right


def switch_moments_(state: dict, policy: str, new_left: torch.Tensor | None, new_right: torch.Tensor | None,
                    low_shape: torch.Size, carry: MomentCarry | None = None) -> None:
    """Carry ``state``'s moments from its current projection to (new_left, new_right) by ``policy``
    (``on_switch``), as ``carry`` says (default: full-precision moments, the moments' dtype)."""
    if policy not in ON_SWITCH:
        raise ValueError(f"on_switch must be one of {ON_SWITCH}, got {policy!r}")
    carry = carry or MomentCarry()
    store = carry.store or MomentStore()
    if policy in ("reproject", "ldadam"):
        (exp_avg,), (exp_avg_sq,) = store.load([state])
        q_left, q_right = carry.rotations or _rotations(state.get(PROJ_LEFT), state.get(PROJ_RIGHT), new_left,
                                                        new_right)
        if exp_avg.dtype != (q_left if q_left is not None else q_right).dtype:
            q_left, q_right = (None if q is None else q.to(exp_avg.dtype) for q in (q_left, q_right))
        sq_left, sq_right = (None if q is None else q.square() for q in (q_left, q_right))
        steps = state.get(ADAM_STEP, 0)
        if policy == "ldadam" and steps > 0:  # the rotated Gaussian's second moment, bias-corrected
            beta1, beta2 = carry.betas
            bc1, bc2 = 1.0 - beta1**steps, 1.0 - beta2**steps
            mean = exp_avg / bc1
            rotated_mean = project_back(mean, q_left, q_right)  # (Q_left·X·Q_right: the same product)
            variance = project_back(exp_avg_sq / bc2 - mean.square(), sq_left, sq_right)
            exp_avg_sq = (variance + rotated_mean.square()).abs_().mul_(bc2)
        else:
            exp_avg_sq = project_back(exp_avg_sq, sq_left, sq_right).clamp_min_(0.0)
        store.replace(state, project_back(exp_avg, q_left, q_right), exp_avg_sq, carry.split)
        return
    if policy == "reset" or low_shape_of(state) != low_shape:
        store.zeros(state, low_shape, state[EXP_AVG] if carry.like is None else carry.like, carry.split)
        state[ADAM_STEP] = 0
