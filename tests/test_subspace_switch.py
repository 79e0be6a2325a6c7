"""on_switch: what Adam's moments do when P changes — exactness of the re-projection, rank changes, keep = GaLore."""
import copy

import pytest
import torch
from torch import nn

import fullrank
from fullrank.optim.units.switch import switch_moments_
from reference import reference_run

BETAS = (0.9, 0.999)


def orthonormal(rows, cols, seed):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)).Q


def moments(lows):
    """Adam's M and V after the low-rank gradients ``lows``."""
    M = torch.zeros_like(lows[0])
    V = torch.zeros_like(lows[0])
    for R in lows:
        M = BETAS[0] * M + (1 - BETAS[0]) * R
        V = BETAS[1] * V + (1 - BETAS[1]) * R * R
    return M, V


def gradients_in(P, n, steps=6, seed=3):
    """m×n gradients whose columns lie in span(P) (left projection)."""
    g = torch.Generator().manual_seed(seed)
    return [P @ torch.randn(P.shape[1], n, generator=g, dtype=torch.float64) for _ in range(steps)]


def switched(P_old, P_new, grads, side):
    """Moments computed in P_old's basis, then carried to P_new by ``reproject``."""
    if side == "left":
        M, V = moments([P_old.T @ G for G in grads])
        state = {"exp_avg": M, "exp_avg_sq": V, "proj_left": P_old}
        switch_moments_(state, "reproject", P_new, None, torch.Size((P_new.shape[1], grads[0].shape[1])))
    else:  # right projection of the transposed problem: R = Gᵀ·Pᵀ with proj_right = Pᵀ
        M, V = moments([G.T @ P_old for G in grads])
        state = {"exp_avg": M, "exp_avg_sq": V, "proj_right": P_old.T.contiguous()}
        switch_moments_(state, "reproject", None, P_new.T.contiguous(), torch.Size((grads[0].shape[1], P_new.shape[1])))
    return state["exp_avg"], state["exp_avg_sq"], M, V


def direct(P_new, grads, side):
    """Moments had P_new been the projection from the start."""
    return moments([P_new.T @ G if side == "left" else G.T @ P_new for G in grads])


@pytest.mark.parametrize("side", ["left", "right"])
def test_reprojection_is_exact_for_the_same_subspace_rotated(side):
    P_old = orthonormal(20, 4, seed=0)
    grads = gradients_in(P_old, 9)
    O = orthonormal(4, 4, seed=1)  # a general rotation of the basis
    M_new, V_new, M_old, V_old = switched(P_old, P_old @ O, grads, side)
    M_ref, V_ref = direct(P_old @ O, grads, side)
    torch.testing.assert_close(M_new, M_ref, rtol=0, atol=1e-12)  # the first moment is linear: exact
    assert (V_new >= 0).all()
    rank_dim = 0 if side == "left" else 1  # (Q∘Q)·V keeps each column's total second moment
    torch.testing.assert_close(V_new.sum(rank_dim), V_old.sum(rank_dim), rtol=1e-12, atol=0)
    assert not torch.allclose(V_new, V_ref, atol=1e-6)  # a general rotation mixes coordinates: V approximated

    signed_permutation = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, -1.0, 1.0],
                                                                                           dtype=torch.float64)
    M_new, V_new, _, _ = switched(P_old, P_old @ signed_permutation, grads, side)
    M_ref, V_ref = direct(P_old @ signed_permutation, grads, side)
    torch.testing.assert_close(M_new, M_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(V_new, V_ref, rtol=0, atol=1e-12)  # the same basis re-ordered: V exact too


@pytest.mark.parametrize("side", ["left", "right"])
def test_reprojection_across_a_rank_change(side):
    P_old = orthonormal(20, 5, seed=0)
    grads = gradients_in(P_old[:, [1, 3]], 9)  # the gradient lives in a part of the old subspace
    shrunk = P_old[:, [3, 1]] * torch.tensor([-1.0, 1.0], dtype=torch.float64)  # r 5 → 2, Q is 2×5
    M_new, V_new, _, _ = switched(P_old, shrunk, grads, side)
    M_ref, V_ref = direct(shrunk, grads, side)
    assert M_new.shape == M_ref.shape == ((2, 9) if side == "left" else (9, 2))
    torch.testing.assert_close(M_new, M_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(V_new, V_ref, rtol=0, atol=1e-12)

    extra = orthonormal(20, 8, seed=5)
    extra = extra - P_old @ (P_old.T @ extra)
    grown = torch.cat([P_old, torch.linalg.qr(extra).Q[:, :2]], dim=1)  # r 5 → 7, Q is 7×5
    M_new, V_new, M_old, V_old = switched(P_old, grown, grads, side)
    M_ref, V_ref = direct(grown, grads, side)
    torch.testing.assert_close(M_new, M_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(V_new, V_ref, rtol=0, atol=1e-12)
    new = (slice(5, 7), slice(None)) if side == "left" else (slice(None), slice(5, 7))
    assert M_new[new].abs().max() < 1e-12 and V_new[new].abs().max() < 1e-12  # new directions start at zero


def test_keep_leaves_the_moments_untouched():
    M, V = torch.randn(4, 9), torch.rand(4, 9)
    state = {"exp_avg": M, "exp_avg_sq": V, "adam_step": 7, "proj_left": orthonormal(20, 4, 0).float()}
    switch_moments_(state, "keep", orthonormal(20, 4, 1).float(), None, torch.Size((4, 9)))
    assert state["exp_avg"] is M and state["exp_avg_sq"] is V and state["adam_step"] == 7
    switch_moments_(state, "keep", orthonormal(20, 3, 1).float(), None, torch.Size((3, 9)))
    assert state["exp_avg"].shape == (3, 9) and state["exp_avg"].abs().sum() == 0 and state["adam_step"] == 0


def test_keep_is_galore_bit_for_bit():
    """Explicit ``on_switch="keep"`` is GaLore's update (moments kept across refreshes), bit for bit, and
    matches the readable reference of eq. 2–7 over three refreshes."""
    W0 = torch.randn(14, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(14, 9, generator=g, dtype=torch.float64) for _ in range(9)]
    runs = []
    for options in ({}, {"on_switch": "keep", "reset_limiter_on_switch": False}):
        W = nn.Parameter(W0.clone())
        opt = fullrank.GaLore([{"params": [W], "rank": 3, "update_proj_gap": 3}], lr=0.05, weight_decay=0.1, **options)
        for G in grads:
            W.grad = G.clone()
            opt.step()
        runs.append(W.detach().clone())
    assert torch.equal(runs[0], runs[1])
    expected, _ = reference_run(W0, grads, rank=3, update_proj_gap=3, scale=0.25, lr=0.05, weight_decay=0.1,
                                residual="discard", limiter="none")
    torch.testing.assert_close(runs[1], expected[-1], rtol=1e-10, atol=1e-10)


def test_reproject_in_the_engine_rotates_the_moments_at_every_switch():
    """AdaRankGrad's switches, rank changes included: M after the step = β1·(M_old·Q) + (1 − β1)·R_new."""
    W = nn.Parameter(torch.zeros(24, 16, dtype=torch.float64))
    opt = fullrank.AdaRankGrad([{"params": [W], "rank": 6, "update_proj_gap": 2}], rank_energy=0.9, svd="exact")
    g = torch.Generator().manual_seed(0)
    spectra = [[5.0, 3.0, 2.0, 1.0], [5.0, 1.0], [4.0, 3.0, 2.5, 2.0, 0.1]]
    ranks, checked = [], 0
    for t in range(12):
        s = torch.tensor(spectra[(t // 4) % 3], dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(24, len(s), generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(16, len(s), generator=g, dtype=torch.float64)).Q
        W.grad = U @ torch.diag(s) @ V.T
        before = copy.deepcopy(opt.state[W]) if opt.state[W] else None
        opt.step()
        state = opt.state[W]
        ranks.append(state["proj_right"].shape[0])
        if before is not None and t % 2 == 0:  # a refresh: Q = Q_old·Q_newᵀ on the right
            Q = before["proj_right"] @ state["proj_right"].T
            R = W.grad @ state["proj_right"].T
            torch.testing.assert_close(state["exp_avg"], BETAS[0] * (before["exp_avg"] @ Q) + (1 - BETAS[0]) * R,
                                       rtol=0, atol=1e-12)
            torch.testing.assert_close(state["exp_avg_sq"],
                                       BETAS[1] * (before["exp_avg_sq"] @ Q.square()) + (1 - BETAS[1]) * R * R,
                                       rtol=0, atol=1e-12)
            checked += 1
    assert checked == 5 and len(set(ranks)) == 3, ranks


@pytest.mark.parametrize("reset", [False, True])
def test_limiter_memory_at_a_switch_is_kept_or_reset(reset):
    W = nn.Parameter(torch.zeros(16, 10))
    opt = fullrank.FiraAdaptive([{"params": [W], "rank": 4, "update_proj_gap": 3}], refresh_threshold=0.0,
                                reset_limiter_on_switch=reset)
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(16, 2, generator=g) @ torch.randn(2, 10, generator=g)
    norms = []
    for t in range(4):
        # nearly rank-2 gradients leave a tiny residual; a full-rank one at the refresh step 3 a big one
        noise = torch.randn(16, 10, generator=g)
        W.grad = noise if t == 3 else low_rank + 0.01 * noise
        opt.step()
        norms.append(opt.state[W]["residual_norm"].item())
    if reset:  # the limiter starts over with the new subspace: the jump passes
        assert norms[3] > 1.5 * norms[2]
    else:  # it remembers the old norm: the jump is cut to γ = 1.01 times it
        assert norms[3] == pytest.approx(1.01 * norms[2], rel=1e-5)
