"""Flora (Hao et al. 2024) and SGD-with-momentum presets against plain reference loops."""
from __future__ import annotations

import math

import pytest
import torch

import fullrank
from transformers.optimization import Adafactor

from fullrank.optim.methods.flora import Flora
from fullrank.optim.methods.sgd import SGDMomentum

torch.set_num_threads(1)


def _reference_next_seed(seed: int) -> int:
    return (seed * 6364136223846793005 + 1442695040888963407) % 2 ** 63


def _reference_projection(seed: int, m: int, n: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rank, m) if m < n else (n, rank), generator=g) / math.sqrt(rank)


def reference_flora(weight: torch.Tensor, grads: list[torch.Tensor], *, lr: float, beta1: float, rank: int,
                    kappa: int, seed: int, weight_decay: float = 0.0) -> torch.Tensor:
    """Algorithm 2 of the Flora paper on one m×n matrix, Adafactor as the base (written out by hand)."""
    w = weight.clone()
    m, n = w.shape
    left = m < n
    row, col = torch.zeros(m), torch.zeros(n)
    momentum = torch.zeros((rank, n) if left else (m, rank))
    for t, g in enumerate(grads, start=1):
        lr_t = lr * max(1e-3, (w.pow(2).mean().sqrt()).item())
        beta2 = 1 - t ** -0.8
        sq = g * g + 1e-30
        row = beta2 * row + (1 - beta2) * sq.mean(1)
        col = beta2 * col + (1 - beta2) * sq.mean(0)
        v_hat = torch.outer(row / row.mean(), col)
        u = g / v_hat.sqrt()
        a = _reference_projection(seed, m, n, rank)
        up = a.T @ momentum if left else momentum @ a.T
        update = (1 - beta1) * u + beta1 * up
        if t % kappa == 0:
            seed = _reference_next_seed(seed)
            a_new = _reference_projection(seed, m, n, rank)
            momentum = a_new @ up if left else up @ a_new
            a = a_new
        down = a @ u if left else u @ a
        momentum = beta1 * momentum + (1 - beta1) * down
        rms = update.pow(2).mean().sqrt()
        update = update / max(1.0, rms.item())
        w = w * (1 - weight_decay * lr_t) - lr_t * update
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_flora_matches_reference_loop(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) for _ in range(7)]
    p = torch.nn.Parameter(w0.clone())
    opt = Flora([{"params": [p], "rank": 4, "update_proj_gap": 3}], lr=0.05, weight_decay=0.1,
                scale_parameter=True)
    assert opt.state[p]["seed"] == 1
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = reference_flora(w0, grads, lr=0.05, beta1=0.9, rank=4, kappa=3, seed=1, weight_decay=0.1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["exp_avg"].shape == ((4, 20) if shape[0] < shape[1] else (20, 4))
    assert opt.state[p]["seed"] != 1  # resampled at steps 3 and 6


def test_flora_without_momentum_is_adafactor():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(10, 16) * 0.1), torch.nn.Parameter(torch.randn(16) * 0.1)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Flora(params, lr=0.02, betas=(0.0, 0.999), rank=4, scale_parameter=True)
    theirs = Adafactor(twins, lr=0.02, scale_parameter=True, relative_step=False, warmup_init=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_flora_keeps_full_momentum_for_embeddings_and_vectors():
    emb = torch.nn.Parameter(torch.randn(100, 8))  # aspect ratio 12.5 > 4: not compressed
    vec = torch.nn.Parameter(torch.randn(8))
    opt = Flora([{"params": [emb, vec], "rank": 4}], lr=0.01)
    emb.grad, vec.grad = torch.randn(100, 8), torch.randn(8)
    opt.step()
    assert opt.state[emb]["exp_avg"].shape == (100, 8) and opt.state[vec]["exp_avg"].shape == (8,)


def test_flora_rejects_bad_options():
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match=r"betas\[0\] \(Flora's beta1\) must lie"):
        Flora(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="kappa must be"):
        Flora(p, kappa=0)
    with pytest.raises(ValueError, match="rank must be"):
        Flora(p, rank=0)


def test_sgd_preset_matches_reference_loop():
    torch.manual_seed(2)
    w0 = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = SGDMomentum([{"params": [p], "rank": 2, "update_proj_gap": 10}], lr=0.1, weight_decay=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w, buf = w0.clone(), None
    for g in grads:
        d = g + 0.01 * w
        buf = d.clone() if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
    torch.testing.assert_close(p.detach(), w)
    with pytest.raises(ValueError, match="momentum must lie"):
        SGDMomentum([p], momentum=1.5)


def test_make_optimizer_builds_the_baselines():
    from fullrank.optim.methods.param_groups import param_groups

    model = torch.nn.Sequential()
    model.add_module("mlp", torch.nn.Linear(8, 8))
    groups = param_groups(model, rank=2, target_modules=("mlp",), update_proj_gap=5)
    assert isinstance(fullrank.make_optimizer("flora", groups, lr=0.01), Flora)
    sgd = fullrank.make_optimizer("sgd", groups, lr=0.01, momentum=0.5)
    assert isinstance(sgd, SGDMomentum) and sgd.param_groups[0]["momentum"] == 0.5


def test_flora_absolute_step_by_default():
    """Without scale_parameter the first step moves every entry by lr·update/max(1, RMS(update))."""
    p = torch.nn.Parameter(torch.full((4, 6), 5.0))
    opt = Flora([{"params": [p], "rank": 2}], lr=0.1)
    p.grad = torch.ones(4, 6)
    opt.step()
    # step 1: factored v̂ = 1 + ε1 everywhere, U = 1, update = 0.1·U + 0.9·0 = 0.1 (RMS 0.1 ≤ 1)
    torch.testing.assert_close(p.detach(), torch.full((4, 6), 5.0 - 0.1 * 0.1))
