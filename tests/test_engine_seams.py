"""The engine's seams, used from outside it: a rule with its own option and state registered from
this file, the error-feedback transform, option declarations and their clashes, all checked against
plain loops written from the equations (tests/reference.py)."""
import pytest
import torch

import fullrank
from fullrank.optim.base import options as components
from fullrank.optim.base.options import Option, number
from fullrank.optim.base.units import scalar_state
from fullrank.optim.units import rules as residual
from fullrank.optim.units import transforms
from reference import PHI_EPS, down, side_of, top_subspace, up


def _grads(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + k % 3) for k in range(steps)]


def _adam(M, V, R, t, betas=(0.9, 0.999), eps=1e-8):
    M = (1 - betas[0]) * R if M is None else betas[0] * M + (1 - betas[0]) * R
    V = (1 - betas[1]) * R * R if V is None else betas[1] * V + (1 - betas[1]) * R * R
    return M, V, (M / (1 - betas[0] ** t)) / ((V / (1 - betas[1] ** t)).sqrt() + eps)


class DampedScaling(residual.Rule):
    """A toy rule: Fira's matrix-level φ (eq. 10), smoothed over steps, φ_t = (1 − d)·φ̂_t + d·φ_{t−1}
    (φ_0 = φ̂_1): one hyperparameter (``damping`` d) and one state tensor per matrix of its own."""

    name = "test_damped_scaling"
    options = {"damping": Option(0.5, number(0.0, 1.0, high_open=True), "d: weight of the previous φ")}
    state = {"test_previous_phi": scalar_state}

    def contribution(self, bucket, options):
        raw = bucket.matrix_norms(bucket.psi) / (bucket.matrix_norms(bucket.low) + residual.PHI_EPS)
        previous = bucket.state("test_previous_phi").view(-1, 1, 1).to(raw.dtype)
        phi = torch.where(previous > 0, (1 - options["damping"]) * raw + options["damping"] * previous, raw)
        sq = (bucket.grad_sq - bucket.matrix_norms(bucket.low).square()).clamp_min(0) * phi.square()
        return residual.Contribution(options["scale"], phi, 1.0, sq.flatten(),
                                     state={"test_previous_phi": phi.view(-1).to(previous.dtype)})


@pytest.fixture
def damped_rule():
    residual.register_rule(DampedScaling())
    yield
    residual.RULE_REGISTRY.pop("test_damped_scaling")


@pytest.mark.parametrize("bucket_cap_mb", [0.0, 256.0])  # one matrix per bucket, and all in one
def test_a_rule_with_its_own_option_and_state_registered_from_a_test_file(damped_rule, bucket_cap_mb):
    shapes = [(12, 7), (12, 7), (6, 11)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k, s in enumerate(shapes)]
    grads = [_grads(s, 6, seed=10 + k) for k, s in enumerate(shapes)]
    params = [torch.nn.Parameter(w.clone()) for w in starts]
    opt = fullrank.SubspaceAdamW([{"params": params, "rank": 3, "update_proj_gap": 3}], lr=0.05, scale=0.25,
                                 residual="test_damped_scaling", limiter="none", damping=0.3,
                                 bucket_cap_mb=bucket_cap_mb)
    for t in range(6):
        for p, seq in zip(params, grads):
            p.grad = seq[t].clone()
        opt.step()
    for W0, seq, p in zip(starts, grads, params):
        W, M, V, previous = W0.clone(), None, None, None
        side = side_of("std", W0.shape)
        for t, G in enumerate(seq, start=1):
            if (t - 1) % 3 == 0:
                left, right = top_subspace(G, 3, side)
            R = down(G, left, right)
            M, V, psi = _adam(M, V, R, t)
            raw = psi.norm() / (R.norm() + PHI_EPS)
            phi = raw if previous is None else 0.7 * raw + 0.3 * previous
            previous = phi
            W = W - 0.05 * (0.25 * up(psi, left, right) + phi * (G - up(R, left, right)))
        torch.testing.assert_close(p.detach(), W, rtol=1e-9, atol=1e-9)
        assert opt.state[p]["test_previous_phi"].dtype == torch.float64
    assert opt.param_groups[0]["damping"] == 0.3
    saved = opt.state_dict()
    again = fullrank.SubspaceAdamW([{"params": params, "rank": 3, "update_proj_gap": 3}], lr=0.05,
                                   residual="test_damped_scaling", limiter="none")
    again.load_state_dict(saved)
    assert torch.equal(again.state[params[0]]["test_previous_phi"], opt.state[params[0]]["test_previous_phi"])


def test_a_registered_option_is_declared_validated_and_listed(damped_rule):
    W = torch.nn.Parameter(torch.randn(6, 4))
    assert fullrank.SubspaceAdamW.option_table()["damping"][0] == 0.5
    with pytest.raises(ValueError, match=r"damping must be a number in \[0.0, 1.0\), got 1.5"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], residual="test_damped_scaling", damping=1.5)


def test_unknown_options_and_clashing_declarations_are_refused():
    W = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(TypeError, match="unknown option.*'damping'.*the options are: .*gamma"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], damping=0.1)

    class Clashing(residual.Rule):
        name = "test_clashing"
        options = {"gamma": Option(2.0, number(1.0), "another γ")}

    with pytest.raises(ValueError, match="'gamma' is declared twice"):
        residual.register_rule(Clashing())
    assert "test_clashing" not in residual.RULE_REGISTRY
    with pytest.raises(TypeError, match="Rule instance"):
        residual.register_rule(object())


def test_gamma_is_declared_once_by_its_limiter():
    declared = [unit for unit in fullrank.optim.units.limiters.LIMITER_REGISTRY.units() if "gamma" in unit.options]
    assert [unit.name for unit in declared] == ["norm_growth"]
    assert fullrank.Fira([torch.nn.Parameter(torch.randn(4, 4))]).defaults["gamma"] == 1.01
    assert fullrank.APOLLO([torch.nn.Parameter(torch.randn(4, 4))]).defaults["gamma"] == 1.01


@pytest.mark.parametrize("error_dtype", ["param", "bfloat16"])
def test_error_feedback_adds_back_what_the_subspace_missed(error_dtype):
    """G̃_t = G_t + E_{t−1}, R_t = Pᵀ·G̃_t (P refreshed from G̃), E_t = G̃_t − P·R_t; GaLore's update."""
    shape = (10, 7)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seq = _grads(shape, 7, seed=3)
    p = torch.nn.Parameter(W0.clone())
    opt = fullrank.GaLore([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=0.1,
                          pre_projection="error_feedback", error_dtype=error_dtype)
    for G in seq:
        p.grad = G.clone()
        opt.step()
    W, M, V, E = W0.clone(), None, None, torch.zeros(shape, dtype=torch.float64)
    for t, G in enumerate(seq, start=1):
        corrected = G + E
        if (t - 1) % 2 == 0:
            left, right = top_subspace(corrected, 2, side_of("std", shape))
        R = down(corrected, left, right)
        E = corrected - up(R, left, right)
        if error_dtype == "bfloat16":
            E = E.to(torch.bfloat16).double()
        M, V, psi = _adam(M, V, R, t)
        W = W - 0.1 * 0.25 * up(psi, left, right)
    tolerance = 1e-9 if error_dtype == "param" else 1e-6
    torch.testing.assert_close(p.detach(), W, rtol=tolerance, atol=tolerance)
    buffer = opt.state[p][transforms.ERROR]
    assert buffer.shape == shape and buffer.dtype == (torch.float64 if error_dtype == "param" else torch.bfloat16)
    loaded = fullrank.GaLore([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=0.1,
                             pre_projection="error_feedback", error_dtype=error_dtype)
    loaded.load_state_dict(opt.state_dict())
    assert loaded.state[p][transforms.ERROR].dtype == buffer.dtype


def test_components_check_their_options_across_others():
    W = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="svd='warm' refines the previous basis"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], svd="warm", rank_energy=0.9)
    with pytest.raises(ValueError, match="needs projector='svd'"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], projector="random", refresh_threshold=0.5)
    with pytest.raises(ValueError, match="pre_projection must be one of \\('none', 'error_feedback'\\)"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], pre_projection="momentum")
    assert components.check_range is fullrank.optim.core.group_options.check_range
