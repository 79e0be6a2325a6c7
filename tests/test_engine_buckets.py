"""The bucketed engine: buckets, registries, state compatibility, refresh policies, compile, residual statistics.

Every engine result here is checked against ``tests/reference.py`` (eq. 2–12 written plainly, one
matrix at a time), a saved checkpoint of engine v1, or a property computed independently.
"""
from pathlib import Path

import pytest
import torch

import fullrank
from fullrank.optim.units import rules as residual_rules
from fullrank.optim.units import limiters
from fullrank.optim.units.svd import exact_svd, warm_subspace
from reference import down, reference_run, side_of, top_subspace, up

DATA = Path(__file__).parent / "data"


def grads_for(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 1.5, 0.7, 2.5, 2.6, 0.5, 3.0, 1.0]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scales[k % 8] for k in range(steps)]


def run_group(W0s, grad_seqs, **options):
    """Weights of every matrix after each step, with one optimizer over all of them."""
    params = [torch.nn.Parameter(W.clone()) for W in W0s]
    opt = fullrank.SubspaceAdamW([{"params": params, "rank": options.pop("rank")}], **options)
    for t in range(len(grad_seqs[0])):
        for p, seq in zip(params, grad_seqs):
            p.grad = None if seq[t] is None else seq[t].clone()
        opt.step()
    return params, opt


COMMON = dict(rank=3, update_proj_gap=3, scale=0.25, lr=0.05, weight_decay=0.1, residual="scale_column",
              limiter="norm_growth", gamma=1.01)


@pytest.mark.parametrize("cap_mb", [0.0, 0.0013, 256.0])  # one matrix, two matrices, all in a bucket
def test_bucketed_step_matches_the_reference_for_every_matrix(cap_mb):
    """Five same-shape matrices (and two of another shape), stacked into buckets of any size, each
    get exactly the reference's update of that matrix alone."""
    shapes = [(12, 7)] * 5 + [(6, 11)] * 2
    W0s = [torch.randn(s, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k, s in enumerate(shapes)]
    seqs = [grads_for(s, 8, 10 + k) for k, s in enumerate(shapes)]
    params, opt = run_group(W0s, seqs, bucket_cap_mb=cap_mb, **COMMON)
    options = {k: v for k, v in COMMON.items()}
    for W0, seq, p in zip(W0s, seqs, params):
        expected, _ = reference_run(W0, seq, **options)
        torch.testing.assert_close(p.detach(), expected[-1], rtol=1e-6, atol=1e-6)
    items = [fullrank.optim.core.buckets.Item(k, k, p, p.grad, f"p{k}") for k, p in enumerate(params)]
    cap = opt.plan(opt.param_groups[0]).values.bucket_cap_mb
    sizes = sorted(len(b) for b in fullrank.optim.core.buckets.buckets(items, opt.state, cap))
    expected_sizes = {0.0: [1] * 7, 0.0013: [1, 2, 2, 2], 256.0: [2, 5]}[cap_mb]  # 12·7·8 B = 672 B a matrix
    assert sizes == expected_sizes


def test_matrices_at_different_steps_share_a_bucket_with_their_own_bias_correction():
    """A matrix that missed a step (no gradient) has its own step count: the bucket uses per-matrix
    bias corrections and refresh times, and both matrices still match the reference."""
    shape = (10, 6)
    W0s = [torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(2)]
    full = grads_for(shape, 7, 1)
    gappy = grads_for(shape, 7, 2)
    gappy[2] = None
    params, _ = run_group(W0s, [full, gappy], **COMMON)
    for W0, seq, p in zip(W0s, [full, [g for g in gappy if g is not None]], params):
        expected, _ = reference_run(W0, seq, **COMMON)
        torch.testing.assert_close(p.detach(), expected[-1], rtol=1e-6, atol=1e-6)


class HalfResidual(residual_rules.Rule):
    """A toy rule: GaLore plus half of the exact residual, unlimited (defined here, registered here)."""

    name = "half_residual"

    def contribution(self, bucket, options):
        phi = torch.full_like(bucket.grad_sq, 0.5)
        residual_sq = 0.25 * (bucket.grad_sq - residual_rules.matrix_norms(bucket.low).square())
        return residual_rules.Contribution(options["scale"], phi, 1.0, residual_sq.flatten())


class Halve(limiters.Limiter):
    def factors(self, norms, previous, options):
        return torch.full_like(norms, 0.5), None


def test_a_rule_and_a_limiter_registered_from_outside_the_engine():
    """The module docstrings' recipe: one class and one registry line each. Checked against a plain
    loop: W ← W − η·(α·P·ψ(R) + ½·c·(G − P·R)), c = ½ from the toy limiter."""
    residual_rules.register_rule(HalfResidual())
    limiters.register_limiter("halve", Halve())
    try:
        shape = (9, 5)
        W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads = grads_for(shape, 5, 3)
        (param,), _ = run_group([W0], [grads], rank=2, update_proj_gap=2, scale=0.5, lr=0.1,
                                residual="half_residual", limiter="halve")
        W, M, V, beta1, beta2 = W0.clone(), None, None, 0.9, 0.999
        for t, G in enumerate(grads, start=1):
            if (t - 1) % 2 == 0:
                left, right = top_subspace(G, 2, side_of("std", shape))
            R = down(G, left, right)
            M = (1 - beta1) * R if M is None else beta1 * M + (1 - beta1) * R
            V = (1 - beta2) * R * R if V is None else beta2 * V + (1 - beta2) * R * R
            psi = (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + 1e-8)
            W = W - 0.1 * (0.5 * up(psi, left, right) + 0.5 * 0.5 * (G - up(R, left, right)))
        torch.testing.assert_close(param.detach(), W, rtol=1e-9, atol=1e-9)
        with pytest.raises(TypeError, match="Rule instance"):
            residual_rules.register_rule(object())
    finally:
        residual_rules.RULE_REGISTRY.pop("half_residual", None)
        limiters.LIMITER_REGISTRY.pop("halve", None)
    with pytest.raises(ValueError, match="residual must be one of"):
        fullrank.SubspaceAdamW([{"params": [torch.nn.Parameter(W0.clone())], "rank": 2}], residual="half_residual")


@pytest.mark.parametrize("saved_by", ["engine_v1", "engine_v2"])
@pytest.mark.parametrize("method", ["fira", "galore", "adarankgrad", "apollo"])
def test_checkpoints_saved_by_earlier_engines_load_and_continue(method, saved_by):
    """tests/data/engine_v1_checkpoints.pt was written by engine v1 (commit 573c892), and
    engine_v2_checkpoints.pt by the engine before its units declared their options (commit 851c590):
    the optimizer state after 5 steps, and the weights reached after 8. Today's engine loads the state
    and takes steps 6–8 to the same weights (to fp32 rounding: v2 orders the update's operations
    differently from v1)."""
    saved = torch.load(DATA / f"{saved_by}_checkpoints.pt", weights_only=True)[method]
    shapes = [(24, 16), (16, 24), (24, 16), (8,)]
    params = [torch.nn.Parameter(w.clone()) for w in saved["weights_at_5"]]
    extra = {"max_rank": 6} if method == "adarankgrad" else {}
    groups = [{"params": params[:3], "rank": 4, "update_proj_gap": 3, **extra}, {"params": params[3:]}]
    opt = fullrank.make_optimizer(method, groups, lr=1e-2)
    opt.load_state_dict(saved["state_dict"])
    for t in range(5, 8):
        g = torch.Generator().manual_seed(100 + t)
        for p, s in zip(params, shapes):
            p.grad = torch.randn(*s, generator=g)
        opt.step()
    for p, expected in zip(params, saved["weights_at_8"]):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_staggered_refresh_spreads_the_group_over_the_gap():
    """With refresh_stagger, matrix k of N refreshes at steps ≡ k·T/N (mod T) after its first step."""
    params = [torch.nn.Parameter(torch.zeros(10, 6)) for _ in range(4)]
    opt = fullrank.GaLore([{"params": params, "rank": 2, "update_proj_gap": 4}], refresh_stagger=True)
    changes = {k: [] for k in range(4)}
    previous = [None] * 4
    for t in range(10):
        for k, p in enumerate(params):
            p.grad = torch.randn(10, 6, generator=torch.Generator().manual_seed(100 * t + k))
        opt.step()
        for k, p in enumerate(params):
            proj = opt.state[p]["proj_right"]
            if previous[k] is None or not torch.equal(proj, previous[k]):
                changes[k].append(t)
            previous[k] = proj.clone()
    assert changes == {0: [0, 4, 8], 1: [0, 1, 5, 9], 2: [0, 2, 6], 3: [0, 3, 7]}


def test_warm_subspace_converges_to_the_top_singular_subspace():
    """Subspace iteration from a perturbed basis: orthonormal, each vector on its old one's side, and
    the captured energy approaches the optimum (exact SVD) as iterations grow."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.linspace(10, 5, 6, dtype=torch.float64), torch.full((34,), 0.5, dtype=torch.float64)])
    G = (U[:, :40] * spectrum) @ V.T
    _, _, Vh = exact_svd(G, 6)
    optimum = (G @ Vh.T).square().sum()
    start = torch.linalg.qr((Vh.T + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64))).Q.T
    energies = []
    for iters in (1, 2, 4):
        Q = warm_subspace(G, start, "right", iters)
        torch.testing.assert_close(Q @ Q.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
        assert ((Q * start).sum(dim=1) >= 0).all()
        energies.append(((G @ Q.T).square().sum() / optimum).item())
    assert energies[0] < energies[1] < energies[2] <= 1 + 1e-12
    assert energies[2] > 0.9999
    P = warm_subspace(G.T, start.T, "left", 4)  # the same basis from the other side
    torch.testing.assert_close(P, Q.T, rtol=0, atol=1e-10)


def test_warm_refresh_in_the_engine_refines_the_previous_basis():
    """svd='warm': the first refresh is the exact SVD; later ones are one subspace iteration from the
    stored P, computed here by hand."""
    W = torch.nn.Parameter(torch.zeros(12, 8, dtype=torch.float64))
    opt = fullrank.GaLore([{"params": [W], "rank": 3, "update_proj_gap": 2}], svd="warm")
    grads = grads_for((12, 8), 3, 5)
    W.grad = grads[0].clone()
    opt.step()
    _, _, Vh = exact_svd(grads[0], 3)
    torch.testing.assert_close(opt.state[W]["proj_right"], Vh)
    W.grad = grads[1].clone()
    opt.step()
    before = opt.state[W]["proj_right"].clone()
    W.grad = grads[2].clone()
    opt.step()  # step 2: a refresh
    Q, R = torch.linalg.qr(grads[2].T @ (grads[2] @ before.T))
    expected = (Q * torch.sgn(torch.diagonal(R))).T
    torch.testing.assert_close(opt.state[W]["proj_right"], expected)
    with pytest.raises(ValueError, match="svd='warm' refines the previous basis"):
        fullrank.AdaRankGrad([{"params": [W], "rank": 3}], svd="warm")


def test_compiled_bucket_step_agrees_with_eager():
    """compile=True runs the residual update through torch.compile(fullgraph=True): no graph break,
    and the same weights as the eager step to fp32 rounding."""
    shapes = [(24, 16)] * 3 + [(16, 24)] * 2

    def run(compile):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(k)))
                  for k, s in enumerate(shapes)]
        opt = fullrank.Fira([{"params": params, "rank": 4, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1,
                            compile=compile, bucket_cap_mb=256)
        for t in range(4):
            g = torch.Generator().manual_seed(50 + t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_residual_stats_report_the_limiter_on_the_device():
    """record_residual_stats: ‖S‖ before and after the limiter (the reference's limited norms), the
    share of matrices limited, as device tensors; None for GaLore (no residual) and when off."""
    shape = (12, 7)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_for(shape, 8, 2)
    _, limited_norms = reference_run(W0, grads, **COMMON)
    param = torch.nn.Parameter(W0.clone())
    opt = fullrank.SubspaceAdamW([{"params": [param], "rank": 3}], **{k: v for k, v in COMMON.items() if k != "rank"})
    assert opt.residual_stats() is None
    opt.record_residual_stats = True
    fractions = []
    for t, G in enumerate(grads):
        param.grad = G.clone()
        opt.step()
        stats = opt.residual_stats()
        assert stats["limited_norm"].item() == pytest.approx(limited_norms[t], rel=1e-9)
        assert stats["residual_norm"].item() >= stats["limited_norm"].item() * (1 - 1e-12)
        fractions.append(stats["limited_fraction"].item())
    assert set(fractions) == {0.0, 1.0}  # the sequence both triggers the limiter and leaves it idle
    galore = fullrank.GaLore([{"params": [param], "rank": 3}])
    galore.record_residual_stats = True
    galore.step()
    assert galore.residual_stats() is None


def test_state_stays_at_the_low_rank_budget_per_matrix():
    """2·r·max(m, n) + r·min(m, n) elements per matrix (``std``), plus two 0-d scalars, whatever the buckets."""
    params = [torch.nn.Parameter(torch.zeros(40, 24)) for _ in range(3)] + [torch.nn.Parameter(torch.zeros(24, 40))]
    opt = fullrank.Fira([{"params": params, "rank": 5}], bucket_cap_mb=0.004)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    for p in params:
        tensors = [v for v in opt.state[p].values() if torch.is_tensor(v)]
        elements = sum(t.numel() for t in tensors)
        assert elements == 2 * 5 * 40 + 5 * 24 + 1
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def test_new_options_are_validated():
    W = torch.nn.Parameter(torch.zeros(6, 4))
    for options, message in [({"limiter_alpha": 0.0}, r"limiter_alpha must be a number in \(0.0, 1.0\]"),
                             ({"warm_iters": 0}, r"warm_iters must be an integer in \[1, inf\]"),
                             ({"bucket_cap_mb": -1}, r"bucket_cap_mb must be a number in \[0.0, inf\]"),
                             ({"refresh_stagger": 1}, r"refresh_stagger must be True or False")]:
        with pytest.raises(ValueError, match=message):
            fullrank.SubspaceAdamW([{"params": [W], "rank": 2}], **options)
    assert fullrank.SubspaceAdamW([{"params": [W], "rank": 2}]).param_groups[0]["bucket_cap_mb"] is None  # auto


class HostReads:
    """Counts the tensor methods that copy a device value to the host (each one a synchronisation on
    a GPU): item, tolist, bool, float, int, numpy, cpu."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", ["fira", "galore", "apollo", "adarankgrad", "fira_gradient_shrink"])
def test_a_steady_step_reads_the_device_once(method, monkeypatch):
    """The non-finite check (with the convergence flags) is the step's one transfer to the host."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 16), torch.nn.Linear(16, 24))
    opt = fullrank.make_optimizer(method, fullrank.param_groups(model, rank=4, target_modules=["0", "1", "2"]),
                                  lr=1e-3)
    for step in range(3):
        if step == 2:
            reads = HostReads(monkeypatch)
        model(torch.randn(8, 16, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert reads.calls == ["tolist"]


def test_layerwise_reads_the_device_once_per_step_not_per_parameter(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 16), torch.nn.Linear(16, 24))
    opt = fullrank.layerwise(model, lambda g: fullrank.Fira(g, lr=1e-3),
                             fullrank.param_groups(model, rank=4, target_modules=["0", "1", "2"]))
    for step in range(3):
        if step == 2:
            reads = HostReads(monkeypatch)
        model(torch.randn(8, 16, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        if step == 2:
            assert reads.calls == []  # six parameters were stepped in the hooks without a read
        opt.step()
    assert reads.calls == ["tolist"]
