"""Properties of the engine's parts: residual, limiter, randomized SVD, presets, plain AdamW."""
import math

import pytest
import torch

import fullrank
from fullrank.optim.base.options import OptionValues
from fullrank.optim.units.limiters import get_limiter
from fullrank.optim.units.projection import project
from fullrank.optim.units.svd import exact_svd, randomized_svd
from reference import down, top_subspace, up


def explicit_residual(G, left, right, kappa=1.0):
    """G − κ·P·R, materialised as the paper writes it."""
    return G - kappa * up(down(G, left, right), left, right)


def limit_factor(kind, norm, state, **options):
    """One matrix's limiter factor c (None: 1), keeping the limiter's norm in ``state`` as the engine does."""
    previous = state.get("residual_norm", torch.zeros_like(norm)).reshape(1)
    factor, kept = get_limiter(kind).factors(norm.reshape(1), previous,
                                                 OptionValues.of({"limiter_alpha": 0.5, **options}))
    if kept is not None:
        state["residual_norm"] = kept.reshape(())
    return None if factor is None else factor.reshape(())


@pytest.mark.parametrize("shape,side", [((20, 9), "right"), ((9, 20), "left"), ((15, 15), "both")])
@pytest.mark.parametrize("kappa", [1.0])
def test_residual_is_orthogonal_to_the_subspace(shape, side, kappa):
    G = torch.randn(shape, dtype=torch.float64)
    left, right = top_subspace(G, 4, side)
    S = explicit_residual(G, left, right, kappa)
    assert S.norm() > 0.1 * G.norm()
    if left is not None:
        assert (left.T @ S).abs().max() < 1e-10
    if right is not None:
        assert (S @ right.T).abs().max() < 1e-10
    assert torch.allclose(project(G, left, right), project(G - S, left, right))


def test_official_residual_is_not_orthogonal_when_alpha_below_one():
    G = torch.randn(20, 9, dtype=torch.float64)
    left, right = top_subspace(G, 4, "right")
    leak = explicit_residual(G, left, right, kappa=0.25) @ right.T
    assert torch.allclose(leak, 0.75 * (G @ right.T))


def test_galore_moves_the_weight_only_inside_the_subspace_of_its_window():
    """Between two refreshes every GaLore update is P·ψ (right projection: ψ·Q): ΔW has no component
    outside span(Q) of the window's refresh, while Fira's full-rank update does."""
    torch.manual_seed(0)
    for method, inside in (("galore", True), ("fira", False)):
        W = torch.nn.Parameter(torch.randn(16, 10, dtype=torch.float64))
        opt = fullrank.make_optimizer(method, [{"params": [W], "rank": 4, "update_proj_gap": 10}], lr=0.01)
        W.grad = torch.randn(16, 10, dtype=torch.float64)
        opt.step()  # refresh at the first step
        Q = opt.state[W]["proj_right"]
        start = W.detach().clone()
        for _ in range(5):
            W.grad = torch.randn(16, 10, dtype=torch.float64)
            opt.step()
        outside = (W.detach() - start) @ (torch.eye(10, dtype=torch.float64) - Q.T @ Q)
        assert (outside.abs().max() < 1e-12) == inside, method


@pytest.mark.parametrize("gamma", [1.0, 1.01, 1.5])
def test_norm_growth_limiter_caps_ratio_exactly_and_only_when_triggered(gamma):
    state = {"residual_norm": torch.tensor(0.0)}
    norms = [2.0, 2.5, 2.0, 2.0, 10.0, 0.1, 0.1000001]
    previous = None
    for raw in norms:
        factor = limit_factor("norm_growth", torch.tensor(raw), state, gamma=gamma)
        limited = raw * factor.item()
        if previous is None or raw <= gamma * previous:
            assert factor.item() == 1.0  # untouched
        else:
            assert limited / previous == pytest.approx(gamma, rel=1e-6)
        assert state["residual_norm"].item() == pytest.approx(limited, rel=1e-6)
        previous = limited


def test_norm_growth_with_infinite_gamma_never_limits():
    state = {"residual_norm": torch.tensor(0.0)}
    for raw in (1.0, 100.0, 1e6):
        assert limit_factor("norm_growth", torch.tensor(raw), state, gamma=math.inf).item() == 1.0


def test_clip_limiter():
    state = {}
    assert limit_factor("clip", torch.tensor(4.0), state, clip_threshold=2.0).item() == 0.5
    assert limit_factor("clip", torch.tensor(1.0), state, clip_threshold=2.0).item() == 1.0
    assert limit_factor("none", torch.tensor(4.0), state) is None


def spectral_gap_matrix(m, n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank + 5, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, rank + 5, generator=g)).Q
    s = torch.cat([torch.linspace(10, 5, rank), torch.full((5,), 0.05)])
    return U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("shape", [(200, 60), (60, 200)])
def test_randomized_svd_finds_the_exact_subspace(shape):
    A = spectral_gap_matrix(*shape, rank=8)
    U_e, S_e, Vh_e = exact_svd(A, 8)
    U_r, S_r, Vh_r = randomized_svd(A, 8, oversample=8, power_iters=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(U_r @ U_r.T, U_e @ U_e.T, atol=1e-4)
    assert torch.allclose(Vh_r.T @ Vh_r, Vh_e.T @ Vh_e, atol=1e-4)
    assert torch.allclose(S_r, S_e, rtol=1e-4)
    assert torch.allclose(U_r.T @ U_r, torch.eye(8), atol=1e-5)


def test_randomized_backend_in_the_engine_trains_like_exact():
    torch.manual_seed(0)
    A = spectral_gap_matrix(40, 30, rank=4)
    results = {}
    for backend in ("exact", "randomized"):
        W = torch.nn.Parameter(torch.zeros(40, 30))
        opt = fullrank.Fira([{"params": [W], "rank": 4}], lr=0.05, svd=backend)
        for _ in range(20):
            W.grad = W.detach() - A
            opt.step()
        results[backend] = W.detach().clone()
    assert torch.allclose(results["exact"], results["randomized"], atol=1e-4)


def test_plain_group_is_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = fullrank.SubspaceAdamW([p1], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([p2], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 3)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


# (our options, torch.optim.AdamW's): the default is torch's fused kernel
KERNEL_PATHS = {"default": ({}, dict(fused=True)), "fused": (dict(fused=True), dict(fused=True)),
                "foreach": (dict(foreach=True), dict(foreach=True)), "loop": (dict(foreach=False), dict(foreach=False))}


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plain_groups_are_torch_adamw_on_every_kernel_path(path, weight_decay):
    """The plain group's fused (default), foreach and per-tensor paths against torch.optim.AdamW on
    the same path."""
    ours_options, torch_options = KERNEL_PATHS[path]
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5, 8), (7,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fullrank.SubspaceAdamW(ours, lr=0.01, weight_decay=weight_decay, **ours_options)
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=weight_decay, **torch_options)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=0, atol=0)
    assert all(opt.state[p]["step"] == 5 for p in ours)


def test_fused_is_refused_where_torch_refuses_it():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="fused=True and foreach=True cannot both be set"):
        fullrank.SubspaceAdamW([p], fused=True, foreach=True)
    with pytest.raises(ValueError, match="adam_convention='transformers'"):
        fullrank.SubspaceAdamW([p], fused=True, adam_convention="transformers")


def test_parameters_without_gradient_are_skipped():
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(6, 4))
    opt = fullrank.Fira([{"params": [a, b], "rank": 2}])
    before = b.detach().clone()
    a.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(b, before) and len(opt.state[b]) == 0 and opt.state[a]["step"] == 1


def test_ablation_presets_choose_their_parts():
    W = torch.nn.Parameter(torch.randn(6, 4))
    groups = [{"params": [W], "rank": 2}]
    expected = {
        "galore": ("discard", "none"), "fira": ("scale_column", "norm_growth"),
        "fira_matrix": ("scale_matrix", "norm_growth"), "fira_no_scaling": ("add", "none"),
        "fira_no_limiter": ("scale_column", "none"), "fira_grad_clipping": ("scale_column", "clip"),
        "fira_only_scaling": ("only_scaling", "norm_growth"),
        "fira_gradient_shrink": ("scale_column", "gradient_shrink"),
        "fira_tensor_scaling": ("scale_column", "tensor_scaling"),
    }
    for name, (rule, limiter) in expected.items():
        group = fullrank.make_optimizer(name, groups, lr=0.01).param_groups[0]
        assert (group["residual"], group["limiter"], group["scale"], group["lr"]) == (rule, limiter, 0.25, 0.01), name
    assert isinstance(fullrank.make_optimizer("adamw", groups, lr=0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match="method must be one of"):
        fullrank.make_optimizer("adam8bit", groups)


@pytest.mark.parametrize("rows", [7, 150])  # 150: the CPU path sums over blocks of 64 rows
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stacked_column_norms_are_each_matrix_s_column_norms(rows, side, dtype):
    """``column_norms`` of a B×m×n stack: for a left projection the norms of each matrix's n columns,
    for a right one of its m rows, accumulated in ≥ fp32 — checked entry by entry with math.fsum."""
    from fullrank.optim.base.norms import column_norms

    stack = (torch.randn(3, rows, 5, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    got = column_norms(stack, side)
    assert got.shape == ((3, 1, 5) if side == "left" else (3, rows, 1))
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    values = stack.double().tolist()
    for b in range(3):
        for k in range(5 if side == "left" else rows):
            entries = [values[b][i][k] for i in range(rows)] if side == "left" else values[b][k]
            expected = math.sqrt(math.fsum(x * x for x in entries))
            index = (b, 0, k) if side == "left" else (b, k, 0)
            assert got[index].item() == pytest.approx(expected, rel=1e-6 if dtype != torch.float64 else 1e-12)
