"""LDAdam (Robert, Safaryan, Modoranu & Alistarh, ICLR 2025, arXiv 2410.16103) as far as the engine's
units reach: a subspace refined by one power iteration at every step, Adam's moments carried into
each new subspace, and error feedback.

The paper's Algorithm 1 (and the official ``ldadamw_torch.LDAdamW``), left projection, bias
corrections b₁ = 1 − β₁^{t−1}, b₂ = 1 − β₂^{t−1} of the previous step::

    A_t  = G_t + E_{t−1}                                            error feedback
    B_t  = ρ·P_{t−1}·M_{t−1}/b₁ + (1 − ρ)·A_t                       what the subspace follows
    P_t  = QR(B_t·B_tᵀ·P_{t−1})                                     one power iteration (SVD at t = 1)
    Q    = P_tᵀ·P_{t−1},   R_t = P_tᵀ·A_t
    M̃    = Q·M_{t−1}                                                projection-aware update rule
    Ṽ    = b₂·|(Q∘Q)·(V_{t−1}/b₂ − (M_{t−1}/b₁)²) + (Q·M_{t−1}/b₁)²|
    M_t  = β₁·M̃ + (1 − β₁)·R_t,   V_t = β₂·Ṽ + (1 − β₂)·R_t²
    W   ← W·(1 − ηλ) − η·P_t·ψ(M_t, V_t)                            ψ: Adam's bias-corrected direction
    E_t  = A_t − P_t·R_t + β₁/(1 − β₁)·(P_{t−1}·M_{t−1} − P_t·M̃)    generalized error feedback

Defaults: β = (0.908, 0.99), ρ = 0.908, rank 16 (pre-training scripts: rank 8), lr 1e-3, ε = 1e-8.

What this preset configures (:class:`LDAdam`): ``svd="warm"`` with ``warm_iters=1`` (one round
P_t = QR(G·Gᵀ·P_{t−1}); exact SVD at the first step), ``update_proj_gap=1`` (forced on every
projected group: a per-step subspace is the method), ``on_switch="ldadam"`` (M̃ = Q·M and the
paper's projection-aware second moment, ``units/switch.py``), ``pre_projection="error_feedback"`` (A = G + E, E ← A − P·R),
``residual="discard"`` (update P·ψ, α = 1), no limiter.

It differs from Algorithm 1 in two places, each a seam the engine lacks (``tests/test_ldadam.py``
checks the preset against a reference with these choices, and that each of them is a real
difference; the second moment's transfer, a third until ``on_switch="ldadam"`` existed, is the paper's):

1. **The power iteration's matrix.** The engine refines P from the corrected gradient G_t + E_{t−1}
   (the refresh sees the pre-projection transform's G̃); LDAdam from
   B_t = ρ·P_{t−1}·M̂_{t−1} + (1 − ρ)·(G_t + E_{t−1}). An SVD backend's ``refine`` does not see the
   moments.
2. **The generalized error feedback.** The engine's E keeps the gradient's compression error
   A − P·R only; LDAdam adds the momentum's, β₁/(1 − β₁)·(I − P_t·P_tᵀ)·P_{t−1}·M_{t−1} — it needs
   P_{t−1} and M_{t−1} at the switch, which the transform does not see.

Also: LDAdam projects a square matrix from the left (``std``: right only when m > n); the engine,
as GaLore, from the right.

FSDP2: the engine refuses ``pre_projection`` on FSDP2-sharded parameters; LDAdam there raises the
engine's ValueError naming ``pre_projection='error_feedback'``.
"""
from __future__ import annotations

import torch

from ..base.options import check_range
from ..core.optimizer import SubspaceAdamW

LDADAM_BETAS = (0.908, 0.99)
LDADAM_LR = 1e-3


class LDAdam(SubspaceAdamW):
    """LDAdam (arXiv 2410.16103, Algorithm 1) from the engine's units: warm-started subspace
    iteration at every step, moments re-projected, error feedback; see the module docstring for the
    three places where it differs from the paper.

    ``update_proj_gap`` (1) is written into every projected group, overriding the group's own (e.g.
    ``param_groups``' default of 200): the per-step refresh defines the method.
    """

    def __init__(self, params, lr=LDADAM_LR, betas=LDADAM_BETAS, eps=1e-8, weight_decay=0.0, *,
                 update_proj_gap: int = 1, scale: float = 1.0, **options):
        check_range("update_proj_gap", update_proj_gap, 1, float("inf"), integer=True)
        if not isinstance(params, torch.Tensor):
            params = [dict(g, update_proj_gap=update_proj_gap) if isinstance(g, dict) and g.get("rank") is not None
                      else g for g in params]
        options.setdefault("svd", "warm")
        options.setdefault("warm_iters", 1)
        options.setdefault("on_switch", "ldadam")
        options.setdefault("pre_projection", "error_feedback")
        options.setdefault("residual", "discard")
        options.setdefault("limiter", "none")
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, update_proj_gap=update_proj_gap,
                         **options)


__all__ = ["LDAdam", "LDADAM_BETAS", "LDADAM_LR"]
