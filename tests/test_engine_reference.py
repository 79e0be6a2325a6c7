"""The engine's fused step against the readable reference of eq. 2–12, for every rule × limiter."""
import itertools

import pytest
import torch

from reference import engine_run, reference_run

RULES = ("discard", "add", "scale_matrix", "scale_column", "only_scaling")
LIMITERS = ("none", "norm_growth", "clip", "gradient_shrink", "tensor_scaling")
SHAPES = ((12, 7), (6, 11))  # tall (right projection under std) and wide (left projection)


def gradient_sequence(shape, steps, seed):
    """Gradients whose norm grows and shrinks, so the limiter both triggers and stays idle."""
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 1.5, 0.7, 2.5, 2.6, 0.5, 3.0, 1.0]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scales[k % len(scales)] for k in range(steps)]


@pytest.mark.parametrize("rule,limiter", list(itertools.product(RULES, LIMITERS)))
@pytest.mark.parametrize("shape", SHAPES)
def test_engine_matches_reference(rule, limiter, shape):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = gradient_sequence(shape, steps=8, seed=2)
    common = dict(rank=3, update_proj_gap=3, scale=0.25, lr=0.05, weight_decay=0.1,
                  residual=rule, limiter=limiter, gamma=1.01, clip_threshold=0.8, limiter_alpha=0.3)
    expected, _ = reference_run(W0, grads, **common)
    actual, _ = engine_run(W0, grads, **common)
    for step, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=f"step {step + 1}")


@pytest.mark.parametrize("proj_type", ("reverse_std", "left", "right", "full"))
def test_projection_types_match_reference(proj_type):
    shape = (10, 7)
    rule = "scale_matrix" if proj_type == "full" else "scale_column"
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = gradient_sequence(shape, steps=5, seed=4)
    common = dict(rank=3, update_proj_gap=2, scale=0.5, lr=0.05, residual=rule, proj_type=proj_type)
    expected, _ = reference_run(W0, grads, **common)
    actual, _ = engine_run(W0, grads, **common)
    torch.testing.assert_close(actual[-1], expected[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ("add", "scale_column"))
def test_official_residual_convention_matches_reference(rule):
    shape = (9, 6)
    W0 = torch.zeros(shape, dtype=torch.float64)
    grads = gradient_sequence(shape, steps=4, seed=5)
    common = dict(rank=2, update_proj_gap=10, scale=0.25, lr=0.1, residual=rule)
    expected, _ = reference_run(W0, grads, convention="official", **common)
    actual, _ = engine_run(W0, grads, residual_convention="official", **common)
    exact, _ = engine_run(W0, grads, **common)
    torch.testing.assert_close(actual[-1], expected[-1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(actual[-1], exact[-1]), "the conventions must differ when alpha != 1"


def test_limiter_triggers_in_the_reference_sequence():
    """Guards the tests above: the gradient sequence really exercises both limiter branches."""
    shape = (12, 7)
    W0 = torch.zeros(shape, dtype=torch.float64)
    grads = gradient_sequence(shape, steps=8, seed=2)
    _, limited = reference_run(W0, grads, rank=3, update_proj_gap=3, scale=0.25, lr=0.05, limiter="norm_growth")
    _, free = reference_run(W0, grads, rank=3, update_proj_gap=3, scale=0.25, lr=0.05, limiter="none")
    ratios = [b / a for a, b in zip(limited, limited[1:])]
    assert any(abs(r - 1.01) < 1e-9 for r in ratios), ratios
    assert any(abs(a - b) < 1e-12 for a, b in zip(limited[1:], free[1:])) or any(r < 1.0 for r in ratios)
