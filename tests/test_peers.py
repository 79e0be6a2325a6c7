"""Our engine against the official packages on the same gradients: ``fira`` (FiraAdamW) and
``galore-torch`` (GaLoreAdamW). Skipped when a package is not installed (``pip install -e .[bench]``).

What is compared: the update ΔW_t = W_t − W_{t−1} of every step, one matrix, 12 steps with a
projection refresh every 3 (steps 0, 3, 6 and 9 recompute P), for a tall matrix (right projection)
and a wide one (left projection). Updates, not weights, are compared: ‖W‖ ≫ ‖ΔW‖ would hide errors.

Conventions. The official packages copy ``transformers``' AdamW: ε is added to √V before the bias
correction, the bias correction c_t = √(1 − β2ᵗ)/(1 − β1ᵗ) is folded into the step size (applied to
the whole update, Fira's scaled residual included) and weight decay comes after the update. Our
default (``torch.optim.AdamW``'s) adds ε after the correction and decays first. With weight decay 0
and ε = 1e-12 on gradients of scale ~1 (√V ≳ 1e-4 throughout), the two agree up to fp32 rounding,
EXCEPT for Fira's norm-growth limiter: ours limits the bias-corrected S, theirs the uncorrected
one, so whenever the limiter fires the ratio ‖S_t‖/‖S_{t−1}‖ it tests differs by c_t/c_{t−1}
(tens of percent over the first steps). The default-convention Fira tests therefore use gradients
on which neither limiter fires (checked in the test), and the ``adam_convention="transformers"``
tests use generic gradients on which it does fire.

Tolerance: the relative error of each step's update, ‖ΔW_ours − ΔW_theirs‖ / ‖ΔW_theirs‖, must be
below 1e-5 (W₀ is small, |W| ~ |ΔW|, so that fp32 rounding of W does not dominate ΔW). Both sides take the same fp32 ``torch.linalg.svd`` of the same matrix (same P, same
signs); what is left is fp32 rounding in a different order of operations (ours assembles
P·(α·ψ − c·φ∘R) + c·φ∘G, theirs α·P·ψ + φ∘(G − α·P·R), which cancels differently where P captures
most of G, and the ε placement above), measured at ≤ 1.5e-6. A wrong convention, a missing factor or a
misplaced refresh shows up as 1e-2 to 1.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fullrank

RANK, GAP, STEPS, LR = 8, 3, 12, 1e-2
SHAPES = [(48, 32), (32, 48)]  # right projection (m ≥ n), left projection
RTOL = 1e-5
DTYPE = torch.float32  # the packages take fp32 SVDs: the same P on both sides


def generic_grads(shape, seed=1):
    """Independent Gaussian gradients: P changes a lot at each refresh and the limiter fires."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=DTYPE) for _ in range(STEPS)]


def quiet_grads(shape, seed=1, rho=0.6, scale=3.0):
    """Gradients on which Fira's norm-growth limiter fires under neither Adam convention.

    Each refresh period has its own r-dimensional subspace (on the side ``std`` projects), so a
    refresh moves P completely; the gradient is a strong part inside it (scale 3, which the SVD
    picks) plus a part outside it shrinking as ρᵗ (ρ = 0.6). ‖S‖ then shrinks by ~ρ per step, more
    than the official convention's ψ grows (by c_{t−1}/c_t ≤ 1.34), while S stays ≥ 2% of the
    update (checked over 12 seeds and both shapes when ρ and the scale were chosen).
    """
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    dim = n if m >= n else m  # right projection: row space; left: column space
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE)).Q
    grads = []
    for t in range(STEPS):
        first = (t // GAP) * RANK % dim
        sub = basis[:, first:first + RANK]
        outside = torch.randn(m, n, generator=gen, dtype=DTYPE) * rho**t
        if m >= n:
            inside = scale * torch.randn(m, RANK, generator=gen, dtype=DTYPE) @ sub.T
            outside = outside - outside @ sub @ sub.T
        else:
            inside = scale * sub @ torch.randn(RANK, n, generator=gen, dtype=DTYPE)
            outside = outside - sub @ (sub.T @ outside)
        grads.append(inside + outside)
    return grads


def updates(make_optimizer, W0, grads):
    """ΔW of every step for the optimizer ``make_optimizer([param])`` on the given gradients."""
    param = torch.nn.Parameter(W0.clone())
    opt = make_optimizer(param)
    out = []
    for g in grads:
        before = param.detach().clone()
        param.grad = g.clone()
        opt.step()
        out.append(param.detach() - before)
    return out


def relative_errors(ours, theirs):
    return [((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs)]


def assert_same_updates(ours, theirs, rtol=RTOL):
    errors = relative_errors(ours, theirs)
    assert max(errors) < rtol, f"per-step relative update errors {['%.2e' % e for e in errors]} (tolerance {rtol})"


def start(shape):
    # |W₀| ~ |ΔW|: the updates are compared to 1e-5, and fp32 rounding of a much larger W (one ulp of
    # |W| per step, in a different order on each side) would be a larger share of ΔW than that
    return 0.01 * torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


# ---------------------------------------------------------------------------- optimizer factories
def official(package: str, class_name: str, scale_key: str):
    """``factory(scale, eps, weight_decay)`` → ``make(param)`` building the package's optimizer on one matrix."""

    def factory(scale, eps=1e-12, weight_decay=0.0):
        module = pytest.importorskip(package)

        def make(param):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(module, class_name)(
                    [{"params": [param], "rank": RANK, "update_proj_gap": GAP, scale_key: scale, "proj_type": "std"}],
                    lr=LR, eps=eps, weight_decay=weight_decay, no_deprecation_warning=True,
                )

        return make

    return factory


def ours(preset):
    """The same for one of our presets (``scale`` is GaLore's α), with engine ``options``."""

    def factory(scale, eps=1e-12, weight_decay=0.0, **options):
        def make(param):
            return preset([{"params": [param], "rank": RANK, "update_proj_gap": GAP}],
                          lr=LR, eps=eps, weight_decay=weight_decay, scale=scale, **options)

        return make

    return factory


official_fira, our_fira = official("fira", "FiraAdamW", "alpha"), ours(fullrank.Fira)
official_galore, our_galore = official("galore_torch", "GaLoreAdamW", "scale"), ours(fullrank.GaLore)


# ---------------------------------------------------------------------------- fira
@pytest.mark.parametrize("shape", SHAPES)
def test_fira_matches_official_at_alpha_1(shape):
    """α = 1: G − P·R and the official G − α·P·R coincide, so the default (exact) residual matches."""
    W0, grads = start(shape), quiet_grads(shape)
    theirs = updates(official_fira(1.0), W0, grads)
    ours = updates(our_fira(1.0), W0, grads)
    assert_same_updates(ours, theirs)
    # The limiter did not fire (else the conventions would legitimately differ, see the docstring).
    assert_same_updates(updates(our_fira(1.0, limiter="none"), W0, grads), ours, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_fira_official_residual_convention_at_alpha_quarter(shape):
    """α = 0.25: ``residual_convention="official"`` (G − α·P·R) reproduces the package; "exact" does not."""
    W0, grads = start(shape), quiet_grads(shape)
    theirs = updates(official_fira(0.25), W0, grads)
    assert_same_updates(updates(our_fira(0.25, residual_convention="official"), W0, grads), theirs)
    exact = updates(our_fira(0.25, residual_convention="exact"), W0, grads)
    assert min(relative_errors(exact, theirs)) > 1e-2  # the comparison can tell the conventions apart


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha, residual_convention", [(1.0, "exact"), (0.25, "official")])
def test_fira_transformers_convention_matches_official_with_limiter(shape, alpha, residual_convention):
    """``adam_convention="transformers"`` matches the package on generic gradients, where the
    limiter fires, with the package's default ε (1e-6) and weight decay."""
    W0, grads = start(shape), generic_grads(shape)
    kw = dict(eps=1e-6, weight_decay=0.1)
    theirs = updates(official_fira(alpha, **kw), W0, grads)
    ours = updates(our_fira(alpha, residual_convention=residual_convention,
                            adam_convention="transformers", **kw), W0, grads)
    assert_same_updates(ours, theirs)
    unlimited = updates(our_fira(alpha, residual_convention=residual_convention,
                                 adam_convention="transformers", limiter="none", **kw), W0, grads)
    assert max(relative_errors(unlimited, ours)) > 1e-2  # the limiter did fire: it was compared too


# ---------------------------------------------------------------------------- galore-torch
@pytest.mark.parametrize("shape", SHAPES)
def test_galore_matches_galore_torch(shape):
    """GaLore (``residual="discard"``) has no limiter: generic gradients, α = 0.25."""
    W0, grads = start(shape), generic_grads(shape)
    theirs = updates(official_galore(0.25), W0, grads)
    assert_same_updates(updates(our_galore(0.25), W0, grads), theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_galore_transformers_convention_matches_galore_torch(shape):
    """With the package's ε (1e-6) and weight decay, ``adam_convention="transformers"`` matches."""
    W0, grads = start(shape), generic_grads(shape)
    kw = dict(eps=1e-6, weight_decay=0.1)
    theirs = updates(official_galore(0.25, **kw), W0, grads)
    assert_same_updates(updates(our_galore(0.25, adam_convention="transformers", **kw), W0, grads), theirs)
