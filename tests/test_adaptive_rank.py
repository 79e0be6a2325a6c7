"""AdaRankGrad's adaptive rank: exact rank selection, the randomized finder, per-matrix state, rank_summary."""
import math

import pytest
import torch
from torch import nn

import fullrank
from fullrank.memory import optimizer_state_bytes
from fullrank.optim.units.rank import energy_rank
from fullrank.optim.units.svd import exact_svd, randomized_svd

SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def spectrum_matrix(m, n, singular_values, seed=0, dtype=torch.float64):
    """U·diag(s)·Vᵀ with random orthonormal U, V: a matrix whose singular values are known exactly."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(singular_values, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (U @ torch.diag(s) @ V.T).to(dtype)


def expected_rank(singular_values, eta, low=1, high=None):
    """Smallest r with σ_1² + … + σ_r² ≥ η·Σσ², from the known spectrum (not from an SVD)."""
    energy = [s * s for s in singular_values]
    total, running = sum(energy), 0.0
    for r, e in enumerate(energy, start=1):
        running += e
        if running >= eta * total:
            break
    high = len(energy) if high is None else high
    return min(max(r, low), high)


def cumulative_fractions(singular_values):
    energy = torch.tensor(singular_values, dtype=torch.float64).square()
    return (energy.cumsum(0) / energy.sum()).tolist()


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_energy_rank_is_the_smallest_rank_keeping_eta(shape):
    G = spectrum_matrix(*shape, SPECTRUM)
    _, S, _ = exact_svd(G, min(shape))
    total = G.square().sum()
    fractions = cumulative_fractions(SPECTRUM)
    for r, fraction in enumerate(fractions[:-1], start=1):
        # just below the r-th cumulative fraction r suffices; just above it r + 1 is needed
        for eta, want in ((fraction - 1e-9, r), (fraction + 1e-9, r + 1)):
            assert expected_rank(SPECTRUM, eta) == want
            got = energy_rank(S, total, eta, 1, min(shape))
            assert got.dtype == torch.int64 and got.dim() == 0
            assert int(got) == want, (eta, int(got), want)


def test_energy_rank_meets_eta_with_equality():
    """At an exact tie Σ_{i≤r} σ_i² = η·‖G‖² the rank is r (the truncation keeps *at least* η)."""
    S = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # energies 4, 1, 1 of a total 8: all exact in binary
    total = torch.tensor(8.0, dtype=torch.float64)
    assert [int(energy_rank(S, total, eta, 1, 3)) for eta in (0.5, 0.625, 0.75, 0.875)] == [1, 2, 3, 3]
    assert [int(energy_rank(S, total, eta, 1, 3)) for eta in (0.4999, 0.5001, 0.6251)] == [1, 2, 3]


def test_energy_rank_bounds_and_full_energy():
    G = spectrum_matrix(30, 20, SPECTRUM)
    _, S, _ = exact_svd(G, 20)
    total = G.square().sum()
    assert int(energy_rank(S, total, 0.01, 3, 10)) == 3  # min_rank
    assert int(energy_rank(S, total, 0.999, 1, 2)) == 2  # max_rank
    full = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, S_full, _ = exact_svd(full, 9)
    assert int(energy_rank(S_full, full.square().sum(), 1.0, 1, 9)) == 9  # η = 1 keeps everything
    # a sketch holding less than η of the energy gives max_rank
    assert int(energy_rank(S_full[:3], full.square().sum(), 0.99, 1, 3)) == 3


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_randomized_finder_agrees_with_exact_svd_on_known_spectra(shape):
    spectrum = SPECTRUM + [0.02] * 34  # a full-rank noise floor under a decaying top
    G = spectrum_matrix(*shape, spectrum)
    total = G.square().sum()
    k = 10
    U_e, S_e, Vh_e = exact_svd(G, k)
    U_r, S_r, Vh_r = randomized_svd(G, k, oversample=8, power_iters=2,
                                    generator=torch.Generator().manual_seed(3))
    for eta in (0.5, 0.85, 0.96, 0.99, 0.998):
        want = expected_rank(spectrum, eta, high=k)
        r_exact = int(energy_rank(S_e, total, eta, 1, k))
        r_rand = int(energy_rank(S_r, total, eta, 1, k))
        assert r_exact == r_rand == want, (eta, r_exact, r_rand, want)
        torch.testing.assert_close(U_r[:, :want] @ U_r[:, :want].T, U_e[:, :want] @ U_e[:, :want].T, atol=1e-6, rtol=0)
        torch.testing.assert_close(Vh_r[:want].T @ Vh_r[:want], Vh_e[:want].T @ Vh_e[:want], atol=1e-6, rtol=0)


def storage_is_own(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_state_is_allocated_at_each_matrix_own_rank(svd):
    shapes = [(24, 10), (10, 24), (16, 16)]
    spectra = [SPECTRUM, [5.0, 0.1, 0.1], [3.0, 3.0, 3.0, 3.0, 0.01]]
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    opt = fullrank.SubspaceAdamW([{"params": params, "param_names": ["tall", "wide", "square"], "rank": 8}],
                                 rank_energy=0.9, svd=svd)
    for p, s in zip(params, spectra):
        p.grad = spectrum_matrix(*p.shape, s, seed=1)
    opt.step()
    want = {name: expected_rank(s, 0.9) for name, s in zip(["tall", "wide", "square"], spectra)}
    assert want == {"tall": 2, "wide": 1, "square": 4}
    assert opt.rank_summary() == dict(min=1, median=2, max=4, mean=7 / 3, ranks=want)
    expected_bytes = 0
    for p, (m, n), r in zip(params, shapes, want.values()):
        state = opt.state[p]
        assert state["exp_avg"].shape == ((m, r) if m >= n else (r, n))
        proj = state["proj_right"] if m >= n else state["proj_left"]
        assert proj.shape == ((r, n) if m >= n else (m, r))
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert storage_is_own(value), key
        expected_bytes += (2 * r * max(m, n) + r * min(m, n) + 1) * 8
    assert optimizer_state_bytes(opt) == expected_bytes


@pytest.mark.parametrize("on_switch", ["reproject", "keep", "reset"])
def test_rank_follows_the_gradient_and_state_shrinks(on_switch):
    W = nn.Parameter(torch.zeros(30, 20, dtype=torch.float64))
    opt = fullrank.SubspaceAdamW([{"params": [W], "rank": 6}], rank_energy=0.95, update_proj_gap=2,
                                 on_switch=on_switch, lr=1e-3)
    spectra = [SPECTRUM, SPECTRUM, [4.0, 1.0, 0.01], [4.0, 1.0, 0.01], [1.0], [1.0]]
    ranks, sizes = [], []
    for t, spectrum in enumerate(spectra):
        W.grad = spectrum_matrix(30, 20, spectrum, seed=t // 2)
        opt.step()
        ranks.append(opt.rank_summary()["max"])
        sizes.append(optimizer_state_bytes(opt))
        assert all(storage_is_own(v) for v in opt.state[W].values() if isinstance(v, torch.Tensor))
    assert ranks == [expected_rank(s, 0.95) for s in spectra] == [3, 3, 2, 2, 1, 1]
    assert sizes[0] > sizes[2] > sizes[4]
    assert opt.state[W]["exp_avg"].shape == (30, 1) and opt.state[W]["proj_right"].shape == (1, 20)
    # keep cannot keep moments of another shape: it resets them, like reset
    assert opt.state[W]["adam_step"] == (6 if on_switch == "reproject" else 2)


def test_rank_summary_reads_no_device_value(monkeypatch):
    params = [nn.Parameter(torch.zeros(12, 8)), nn.Parameter(torch.zeros(8, 12)), nn.Parameter(torch.zeros(5))]
    opt = fullrank.AdaRankGrad([{"params": params[:2], "param_names": ["a", "b"], "rank": 4},
                                {"params": params[2:], "param_names": ["c"]}])
    assert opt.rank_summary() == dict(min=None, median=None, max=None, mean=None, ranks={})
    for p in params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    opt.step()

    def forbidden(*_, **__):
        raise AssertionError("rank_summary read a tensor's value")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    summary = opt.rank_summary()
    monkeypatch.undo()
    assert set(summary["ranks"]) == {"a", "b"}
    assert summary["median"] == (summary["ranks"]["a"] + summary["ranks"]["b"]) / 2


def test_layerwise_rank_summary_matches_the_ordinary_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 6))
    names = ["0.weight", "1.weight"]
    groups = [{"params": [model[0].weight, model[1].weight], "param_names": names, "rank": 4},
              {"params": [model[0].bias, model[1].bias], "param_names": ["0.bias", "1.bias"]}]
    make = lambda g: fullrank.AdaRankGrad(g, lr=1e-3, rank_energy=0.6, svd="exact")  # noqa: E731
    ordinary = make(groups)
    x = torch.randn(32, 10)
    model(x).square().mean().backward()
    ordinary.step()
    twin = nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 6))
    twin.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    handle = fullrank.layerwise(twin, make, [dict(groups[0], params=[twin[0].weight, twin[1].weight]),
                                             dict(groups[1], params=[twin[0].bias, twin[1].bias])])
    for p in twin.parameters():  # the hooks fire on backward; here the gradients are given
        handle.optimizer.step_parameter(p)
    handle.step()
    assert handle.rank_summary() == ordinary.rank_summary()
    assert set(handle.rank_summary()["ranks"]) == set(names)


W = lambda *shape: nn.Parameter(torch.randn(*shape))  # noqa: E731


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rank_energy": 0.0}, r"rank_energy must be a number in \(0.0, 1.0\], got 0.0"),
        ({"rank_energy": 1.5}, r"rank_energy must be a number in \(0.0, 1.0\], got 1.5"),
        ({"rank_energy": -0.2}, r"rank_energy must be a number in \(0.0, 1.0\]"),
        ({"rank_energy": math.nan}, r"rank_energy must be a number in \(0.0, 1.0\]"),
        ({"rank_energy": 0.9, "min_rank": 3, "max_rank": 2},
         r"min_rank must be an integer in \[1, max_rank=2\], got 3"),
        ({"rank_energy": 0.9, "min_rank": 4}, r"min_rank must be an integer in \[1, max_rank=3\], got 4"),
        ({"rank_energy": 0.9, "min_rank": 0}, r"min_rank must be an integer in \[1, inf\], got 0"),
        ({"rank_energy": 0.9, "max_rank": 0}, r"max_rank must be an integer in \[1, inf\], got 0"),
        ({"rank_energy": 0.9, "max_rank": 2.5}, r"max_rank must be an integer"),
        ({"refresh_threshold": 1.0}, r"refresh_threshold must be a number in \[0.0, 1.0\), got 1.0"),
        ({"refresh_threshold": -0.1}, r"refresh_threshold must be a number in \[0.0, 1.0\)"),
        ({"refresh_beta": 1.0}, r"refresh_beta must be a number in \[0.0, 1.0\), got 1.0"),
        ({"projector": "qr"}, r"projector must be one of \('svd', 'random'.*\), got 'qr'"),
        ({"scaling_granularity": "row"}, r"scaling_granularity must be one of \('column', 'tensor'\), got 'row'"),
        ({"scaling_multiplier": 0.0}, r"scaling_multiplier must be a number in \(0.0, inf\], got 0.0"),
        ({"adam_convention": "jax"}, r"adam_convention must be one of \('torch', 'transformers'\), got 'jax'"),
        ({"projector": "random", "rank_energy": 0.9}, r"rank_energy \(adaptive rank\) .* needs projector='svd'"),
        ({"projector": "random", "refresh_threshold": 0.5}, r"refresh_threshold > 0 .* needs projector='svd'"),
        ({"projector": "random", "residual": "only_scaling", "on_switch": "reproject"},
         r"on_switch must be one of \('keep', 'reset'\)"),
    ],
)
def test_bad_adaptive_and_random_options_name_the_range(options, message):
    with pytest.raises(ValueError, match=message):
        fullrank.SubspaceAdamW([{"params": [W(6, 4)], "param_names": ["w"], "rank": 3}], **options)


def test_min_rank_above_a_matrix_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"min_rank of parameter 'w' \(6, 2\) must be an integer in \[1, 2\], got 3"):
        fullrank.AdaRankGrad([{"params": [W(6, 2)], "param_names": ["w"], "rank": 2}], min_rank=3, max_rank=8)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("apollo", {"scale_type": "row"}, r"scale_type must be one of \('channel', 'tensor'\)"),
        ("apollo", {"apollo_scale": 0.0}, r"apollo_scale must be a number in \(0.0, inf\]"),
        ("apollo_mini", {"rank": 0}, r"rank must be an integer in \[1, inf\]"),
    ],
)
def test_bad_preset_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        fullrank.make_optimizer(name, [{"params": [W(6, 4)], "rank": 2}], **options)


def test_new_presets_choose_their_parts():
    groups = [{"params": [W(12, 8)], "rank": 4}]
    expected = {
        "adarankgrad": dict(residual="discard", limiter="none", svd="randomized", on_switch="reproject",
                            rank_energy=0.9, refresh_threshold=0.5, projector="svd", rank=4),
        "fira_adaptive": dict(residual="scale_column", limiter="norm_growth", svd="randomized",
                              on_switch="reproject", rank_energy=0.9, refresh_threshold=0.5, scale=0.25, rank=4),
        "apollo": dict(residual="only_scaling", limiter="norm_growth", projector="random", on_switch="keep",
                       scaling_granularity="column", scaling_multiplier=1.0, gamma=1.01, rank=4),
        "apollo_mini": dict(residual="only_scaling", limiter="norm_growth", projector="random",
                            scaling_granularity="tensor", scaling_multiplier=math.sqrt(128), rank=1),
    }
    for name, want in expected.items():
        group = fullrank.make_optimizer(name, groups, lr=0.02).param_groups[0]
        assert {k: group[k] for k in want} == want, name
        assert group["lr"] == 0.02
    assert groups[0]["rank"] == 4  # APOLLO-Mini set rank 1 on a copy
    for cls in (fullrank.AdaRankGrad, fullrank.FiraAdaptive, fullrank.APOLLO, fullrank.APOLLO_Mini):
        assert cls.__name__ in fullrank.__all__ and cls.__name__ in fullrank.optim.__all__


def load_into(optimizer, saved):
    """Load ``saved``'s state under ``optimizer``'s own group options (torch would restore the saved ones)."""
    own = optimizer.state_dict()["param_groups"]
    saved = dict(saved, param_groups=[dict(g, params=s["params"]) for g, s in zip(own, saved["param_groups"])])
    optimizer.load_state_dict(saved)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_adaptive_resume_accepts_any_rank_in_bounds_and_refuses_others(shape):
    W1 = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = fullrank.AdaRankGrad([{"params": [W1], "param_names": ["w"], "rank": 6}], rank_energy=0.95)
    W1.grad = spectrum_matrix(*shape, [4.0, 1.0, 0.01])
    opt.step()
    assert opt.rank_summary()["ranks"] == {"w": 2}
    saved = opt.state_dict()
    W2 = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    same = fullrank.AdaRankGrad([{"params": [W2], "param_names": ["w"], "rank": 4}], rank_energy=0.5)
    load_into(same, saved)  # another η and max_rank: rank 2 is still in [1, 4]
    assert same.rank_summary()["ranks"] == {"w": 2}
    m, n = shape
    projection = r"proj_right \(2, 30\)" if m < n else r"proj_right \(2, 20\)"
    projection = r"proj_left \(20, 2\)" if m < n else projection
    narrow = fullrank.AdaRankGrad([{"params": [W2], "param_names": ["w"], "rank": 6}], rank_energy=0.95, min_rank=3)
    with pytest.raises(ValueError, match=projection + rf" does not fit a {m}×{n} weight at a rank in \[3, 6\]"):
        load_into(narrow, saved)
    fixed = fullrank.GaLore([{"params": [W2], "param_names": ["w"], "rank": 6}])
    with pytest.raises(ValueError, match=projection + rf" does not fit a {m}×{n} weight at rank 6"):
        load_into(fixed, saved)
