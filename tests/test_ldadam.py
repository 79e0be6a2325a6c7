"""LDAdam (Robert et al., ICLR 2025, arXiv 2410.16103) from the engine's units: the preset against a
reference written from the paper's Algorithm 1, with a switch for each of three places where the
engine's units could differ from it (two do; the second moment follows the paper,
``fullrank/optim/ldadam.py``), state size, resume, training, FSDP2.

``ldadam_reference`` implements Algorithm 1 with a switch for each of those three places:

* ``subspace``: ``"blend"`` — power iteration on B = ρ·P_{t−1}·M̂_{t−1} + (1 − ρ)·(G + E) (paper);
  ``"corrected"`` — on G + E (the engine's ``svd="warm"``, which refreshes on the transform's G̃);
* ``second_moment``: ``"ldadam"`` — the variance V̂ − M̂² rotated by Q∘Q plus (Q·M̂)² (paper, and the
  engine's ``on_switch="ldadam"``); ``"rotate"`` — (Q∘Q)·V clamped at 0 (``on_switch="reproject"``);
* ``error_feedback``: ``"generalized"`` — gradient and momentum compression errors (paper);
  ``"gradient"`` — the gradient's only (the engine's ``pre_projection="error_feedback"``).

The official code is not on PyPI; ``pip install git+https://github.com/IST-DASLab/LDAdam`` installs
it as ``ldadamw_torch`` (package "LDAdam" 1.0.0), and the update-for-update test against it runs
only where it is installed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fullrank
from reference import engine_run
from tiny_block import Tiny, assert_resume_is_exact, assert_step_refused_on_fsdp2, tiny_data, train_tiny
from fullrank.memory import optimizer_state_bytes
from fullrank.optim.methods.ldadam import LDAdam

PAPER = dict(subspace="blend", second_moment="ldadam", error_feedback="generalized")
ENGINE = dict(subspace="corrected", second_moment="ldadam", error_feedback="gradient")


# --------------------------------------------------------------------------- reference (Algorithm 1)
def _left(shape, square_left):
    """LDAdam projects from the left when m ≤ n (m < n for the engine / GaLore's ``std``)."""
    m, n = shape
    return m < n or (square_left and m == n)


def _orthonormal(Y):
    return torch.linalg.qr(Y).Q


def ldadam_reference(W0, grads, *, rank, lr, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0, rho=0.908,
                     subspace="blend", second_moment="ldadam", error_feedback="generalized", square_left=True):
    """Weights after each step. Everything is written for a left projection P (m×r); a right one is
    the same on Gᵀ (so Q = P_newᵀ·P_old acts on the moments' other side)."""
    beta1, beta2 = betas
    W, history = W0.clone(), []
    left = _left(W0.shape, square_left)
    T = (lambda X: X) if left else (lambda X: X.T)  # work on Gᵀ for a right projection
    E = torch.zeros_like(T(W0))
    P = M = V = None
    for t, G in enumerate(grads, start=1):
        G = T(G)
        A = G + E if error_feedback != "none" else G
        if P is None:
            U, _, _ = torch.linalg.svd(A, full_matrices=False)
            P_new = U[:, :rank]
        else:
            b1 = 1 - beta1 ** (t - 1)
            B = rho * (P @ M) / b1 + (1 - rho) * A if subspace == "blend" else A
            P_new = _orthonormal(B @ (B.T @ P))  # one power iteration from the previous basis
        R = P_new.T @ A
        if P is None:
            M_t, V_t = torch.zeros_like(R), torch.zeros_like(R)
            momentum_error = 0.0
        else:
            b1, b2 = 1 - beta1 ** (t - 1), 1 - beta2 ** (t - 1)
            Q = P_new.T @ P
            M_t = Q @ M
            if second_moment == "ldadam":  # projection-aware update of the second moment
                V_t = b2 * ((Q * Q) @ (V / b2 - (M / b1) ** 2) + (M_t / b1) ** 2).abs()
            else:
                V_t = ((Q * Q) @ V).clamp_min(0.0)
            momentum_error = beta1 / (1 - beta1) * (P @ M - P_new @ M_t)
        if error_feedback == "generalized":
            E = A - P_new @ R + momentum_error
        elif error_feedback == "gradient":
            E = A - P_new @ R
        M = beta1 * M_t + (1 - beta1) * R
        V = beta2 * V_t + (1 - beta2) * R * R
        psi = (M / (1 - beta1 ** t)) / ((V / (1 - beta2 ** t)).sqrt() + eps)
        P = P_new
        W = W * (1 - lr * weight_decay) - lr * T(P @ psi)
        history.append(W.clone())
    return history


def _gradients(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + k % 3) for k in range(steps)]


def _engine_run(W0, grads, **options):
    return engine_run(W0, grads, optimizer=LDAdam, **options)


COMMON = dict(rank=3, lr=0.02, weight_decay=0.1)


# --------------------------------------------------------------------------- update for update
@pytest.mark.parametrize("shape", [(12, 7), (6, 11)])  # right and left projections
def test_preset_matches_algorithm_1_with_the_engines_choices(shape):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = _gradients(shape, 7, 2)  # a new subspace at every step
    expected = ldadam_reference(W0, grads, **COMMON, **ENGINE)
    actual, opt = _engine_run(W0, grads, **COMMON)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8, msg=f"step {step}")
    assert opt.param_groups[0]["update_proj_gap"] == 1


@pytest.mark.parametrize("choice", sorted(k for k in PAPER if PAPER[k] != ENGINE[k]))
def test_each_of_the_engines_choices_differs_from_the_paper(choice):
    """Guards the preset's documentation: switching any one place to the engine's choice changes
    LDAdam's trajectory (the gap is not a rounding matter)."""
    shape = (12, 7)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = _gradients(shape, 6, 4)
    paper = ldadam_reference(W0, grads, **COMMON, **PAPER)
    one_off = ldadam_reference(W0, grads, **COMMON, **{**PAPER, choice: ENGINE[choice]})
    assert (paper[-1] - one_off[-1]).abs().max() > 1e-6


def test_reference_second_moment_rule_is_reproject_for_a_permutation():
    """The two second-moment rules agree when Q is a signed permutation (the same basis re-ordered)."""
    torch.manual_seed(0)
    M, V = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64) + 1.0
    Q = torch.tensor([[0, -1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    b1, b2 = 0.3, 0.05
    ldadam = b2 * ((Q * Q) @ (V / b2 - (M / b1) ** 2) + (Q @ M / b1) ** 2).abs()
    torch.testing.assert_close(ldadam, (Q * Q) @ V)


def test_paper_reference_matches_official_ldadamw():
    """Update for update against the authors' ``ldadamw_torch.LDAdamW`` (its QR runs in fp32)."""
    official = pytest.importorskip("ldadamw_torch", reason="the official LDAdam package is not installed")
    for shape in ((12, 7), (6, 11), (8, 8)):
        W0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads = _gradients(shape, 6, 6)
        expected = ldadam_reference(W0, grads, **COMMON, **PAPER)
        W = nn.Parameter(W0.clone())
        opt = official.LDAdamW([{"params": [W], "enable_lowrank": True, "rank": 3, "rho": 0.908}],
                               lr=COMMON["lr"], betas=(0.908, 0.99), eps=1e-8, weight_decay=COMMON["weight_decay"])
        for step, (G, e) in enumerate(zip(grads, expected), start=1):
            W.grad = G.clone() if W.grad is None else W.grad + G  # its error buffer lives in .grad
            opt.step()
            torch.testing.assert_close(W.detach(), e, rtol=1e-4, atol=1e-5, msg=f"{shape}, step {step}")


# --------------------------------------------------------------------------- state, resume, training
def test_state_bytes_against_adamw():
    """Moments at r·max(m, n), P, and error feedback's m×n buffer (the official code keeps that
    buffer in ``param.grad`` instead): less than AdamW's 2·m·n, more than GaLore's."""
    model, adamw_model = Tiny(), Tiny()
    opt = fullrank.make_optimizer("ldadam", fullrank.param_groups(model, rank=4), lr=1e-3)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-3)
    data = tiny_data()
    train_tiny(model, opt, 2, data)
    train_tiny(adamw_model, adamw, 2, data)
    projected, names = opt.param_groups[0]["params"], opt.param_groups[0]["param_names"]
    ldadam_bytes = optimizer_state_bytes(opt, projected)
    adamw_bytes = optimizer_state_bytes(adamw, [p for n, p in adamw_model.named_parameters() if n in names])
    expected = sum(4 * (p.numel() + 2 * 4 * max(p.shape) + 4 * min(p.shape)) for p in projected)
    assert expected <= ldadam_bytes <= expected + 64 * len(projected)
    assert ldadam_bytes < adamw_bytes


def test_resume_is_exact_through_torch_load_weights_only():
    data = tiny_data(1)

    def build(model):
        return fullrank.make_optimizer("ldadam", fullrank.param_groups(model, rank=4), lr=3e-3, weight_decay=0.01)

    assert_resume_is_exact(build, 3, 3, data, check=lambda opt: any("error" in s for s in opt.state.values()))


def test_preset_trains_a_tiny_model_at_a_per_step_subspace():
    model = Tiny(seed=3)
    groups = fullrank.param_groups(model, rank=4)  # update_proj_gap=200 in the group: the preset forces 1
    opt = fullrank.make_optimizer("ldadam", groups, lr=1e-2)
    assert [g.get("update_proj_gap") for g in opt.param_groups if g.get("rank")] == [1]
    losses = train_tiny(model, opt, 40, tiny_data(2))
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- FSDP2
def test_fsdp2_refuses_error_feedback_clearly():
    """The engine refuses pre-projection transforms on FSDP2 shards: LDAdam's step raises a ValueError
    naming the option, and changes nothing."""
    assert_step_refused_on_fsdp2("ldadam", "pre_projection='error_feedback' is not supported on FSDP2")
