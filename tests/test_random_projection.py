"""Random projections (APOLLO, GoLore), the only_scaling options, and the published apollo-torch package."""
import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import fullrank
from fullrank.memory import optimizer_state_bytes
from fullrank.optim.units import projectors
from fullrank.optim.units.projectors import gaussian_projection, orthonormal_random_projection
from reference import reference_run


def test_gaussian_projection_is_apollos_sketch_regenerated_from_its_seed():
    left, right = gaussian_projection((300, 40), "left", 8, seed=11, device=torch.device("cpu"), dtype=torch.float32)
    assert right is None and left.shape == (300, 8)
    again, _ = gaussian_projection((300, 40), "left", 8, seed=11, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(left, again)
    other, _ = gaussian_projection((300, 40), "left", 8, seed=12, device=torch.device("cpu"), dtype=torch.float32)
    assert not torch.equal(left, other)
    assert left.square().mean().item() == pytest.approx(1 / 8, rel=0.05)  # N(0, 1/r)
    _, right = gaussian_projection((40, 300), "right", 8, seed=11, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert right.shape == (8, 300) and right.dtype == torch.bfloat16
    # drawn in fp32 whatever the dtype, so a bf16 run sees the rounded fp32 sketch
    _, right32 = gaussian_projection((40, 300), "right", 8, seed=11, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(right, right32.to(torch.bfloat16))


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_orthonormal_random_projection(side):
    left, right = orthonormal_random_projection((30, 20), side, 5, seed=3, device=torch.device("cpu"),
                                                dtype=torch.float32)
    for P, gram in ((left, lambda p: p.T @ p), (right, lambda p: p @ p.T)):
        if P is not None:
            torch.testing.assert_close(gram(P), torch.eye(5), atol=1e-5, rtol=0)
            assert P.is_contiguous() and P.untyped_storage().nbytes() == P.numel() * 4
    assert (left is None) == (side == "right") and (right is None) == (side == "left")


def test_apollo_stores_seeds_not_matrices():
    shapes = [(32, 12), (12, 32)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = fullrank.APOLLO([{"params": params, "rank": 4, "update_proj_gap": 2}], lr=0.01)
    seeds = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        seeds.append([opt.state[p]["proj_seed"] for p in params])
    for p, (m, n) in zip(params, shapes):
        state = opt.state[p]
        assert set(state) == {"step", "adam_step", "residual_norm", "exp_avg", "exp_avg_sq", "proj_seed"}
        assert isinstance(state["proj_seed"], int) and state["exp_avg"].shape == ((m, 4) if m >= n else (4, n))
    assert seeds[0] == seeds[1] != seeds[2]  # redrawn at steps 0 and 2, one seed per matrix
    assert len(set(seeds[0])) == 2
    assert optimizer_state_bytes(opt) == sum(2 * 4 * max(s) + 1 for s in shapes) * 4
    assert opt.rank_summary()["ranks"] == {"param 0": 4, "param 1": 4}


def test_golore_random_basis_is_stored_orthonormal_and_redrawn():
    W = nn.Parameter(torch.zeros(20, 12))
    opt = fullrank.GaLore([{"params": [W], "rank": 3, "update_proj_gap": 2}], projector="random", seed=5)
    drawn = []
    for _ in range(3):
        W.grad = torch.randn(20, 12)
        opt.step()
        drawn.append(opt.state[W]["proj_right"].clone())
    torch.testing.assert_close(drawn[0] @ drawn[0].T, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[1], drawn[2])
    _, expected = orthonormal_random_projection((20, 12), "right", 3, projectors.projection_seed(5, 0, 2),
                                                torch.device("cpu"), torch.float32)
    assert torch.equal(drawn[2], expected)


@pytest.mark.parametrize("granularity", ["column", "tensor"])
@pytest.mark.parametrize("shape", [(12, 7), (6, 11)])
def test_only_scaling_granularity_and_multiplier_match_the_reference(granularity, shape):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * s for s in (1.0, 1.5, 0.7, 2.5, 2.6, 0.5)]
    W = nn.Parameter(W0.clone())
    opt = fullrank.SubspaceAdamW([{"params": [W], "rank": 3}], lr=0.05, weight_decay=0.1, update_proj_gap=3,
                                 residual="only_scaling", scaling_granularity=granularity, scaling_multiplier=3.0)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    expected, _ = reference_run(W0, grads, rank=3, update_proj_gap=3, scale=0.25, lr=0.05, weight_decay=0.1,
                                residual="only_scaling", granularity=granularity, multiplier=3.0)
    torch.testing.assert_close(W.detach(), expected[-1], rtol=1e-6, atol=1e-6)


def test_tensor_granularity_allows_a_two_sided_projection():
    W = nn.Parameter(torch.zeros(10, 8))
    opt = fullrank.SubspaceAdamW([{"params": [W], "rank": 2, "proj_type": "full"}], residual="only_scaling",
                                 scaling_granularity="tensor")
    W.grad = torch.randn(10, 8)
    opt.step()
    assert opt.state[W]["exp_avg"].shape == (2, 2)
    with pytest.raises(ValueError, match="needs a one-sided projection"):
        fullrank.SubspaceAdamW([{"params": [W], "rank": 2, "proj_type": "full"}], residual="only_scaling")


@pytest.mark.parametrize("method", ["apollo", "adarankgrad"])
def test_layerwise_draws_the_same_random_numbers_as_one_optimizer(method):
    """Per-parameter optimizers seed their random projections (and randomized SVDs) by the parameter's
    position in the groups, as one optimizer over all parameters does."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 12), nn.Linear(12, 20))
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 12), nn.Linear(12, 20))
    model.load_state_dict(reference.state_dict())

    def groups(m):
        return [{"params": [m[k].weight for k in range(3)], "param_names": [f"{k}.weight" for k in range(3)],
                 "rank": 4, "update_proj_gap": 2},
                {"params": [m[k].bias for k in range(3)], "param_names": [f"{k}.bias" for k in range(3)]}]

    make = lambda g: fullrank.make_optimizer(method, g, lr=0.01)  # noqa: E731
    ordinary = make(groups(reference))
    handle = fullrank.layerwise(model, make, groups(model))
    for step in range(5):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        for m in (reference, model):
            m(x).square().mean().backward()
        ordinary.step()
        ordinary.zero_grad()
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert handle.rank_summary() == ordinary.rank_summary()


# ---------------------------------------------------------------- the published apollo-torch 1.0.3

def apollo_modules():
    """apollo_torch's ``apollo``, ``random_projector`` and ``adamw`` (GaLore's AdamW) modules.

    The package's ``__init__`` imports bitsandbytes for its 8-bit optimizers, which these tests do not
    need (and a --no-deps install lacks): the three plain-torch modules are loaded from the package's
    folder without running it.
    """
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None:
        pytest.skip("apollo-torch is not installed (pip install --no-deps apollo-torch==1.0.3)")
    pytest.importorskip("transformers")  # apollo_torch.apollo imports transformers.utils.versions
    package = sys.modules.get("_apollo_torch_plain")
    if package is None:
        package = types.ModuleType("_apollo_torch_plain")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["_apollo_torch_plain"] = package
    return [importlib.import_module(f"_apollo_torch_plain.{name}") for name in ("apollo", "random_projector", "adamw")]


SHAPES = [(24, 16), (12, 20), (16,)]  # tall (right projection), wide (left projection), a plain bias
STEPS, GAP, LR = 12, 5, 0.01


def gradient_sequence():
    """Gradients whose scale jumps, so the norm-growth limiter both triggers and stays idle."""
    g = torch.Generator().manual_seed(0)
    scales = [1.0, 1.5, 0.7, 2.5, 2.6, 0.5, 3.0, 1.0]
    return [[torch.randn(s, generator=g) * scales[t % 8] for s in SHAPES] for t in range(STEPS)]


def tolerance(weights):
    """fp32 rounding: the two codes order the same operations differently (fused addcmul/addmm, decay
    before or after), each step can leave a few ulps of |W| between them; 4 per step bounds it."""
    return 4 * STEPS * torch.finfo(torch.float32).eps * max(w.abs().max().item() for w in weights)


def compare(theirs_factory, ours_factory):
    """Max |W_theirs − W_ours| over the run, the tolerance, and how far the weights moved."""
    init = [torch.randn(s, generator=torch.Generator().manual_seed(7 + k)) for k, s in enumerate(SHAPES)]
    theirs = [nn.Parameter(x.clone()) for x in init]
    ours = [nn.Parameter(x.clone()) for x in init]
    a, b = theirs_factory(theirs), ours_factory(ours)
    diff = 0.0
    for grads in gradient_sequence():
        for p, q, g in zip(theirs, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        diff = max(diff, max((p - q).abs().max().item() for p, q in zip(theirs, ours)))
    moved = max((p - x).abs().max().item() for p, x in zip(theirs, init))
    return diff, tolerance(theirs), moved


@pytest.fixture
def apollo_seeds(monkeypatch):
    """Our projection seeds replaced by apollo-torch's: parameter k (1-based) starts at seed k and
    advances by ``next_seed`` at every redraw. The matrices are then drawn identically (torch.randn on
    a CPU generator in fp32, divided by √r): only the seed schedule is a convention."""
    apollo, projector, galore = apollo_modules()

    def chain(ordinal, step):
        seed = ordinal + 1
        for _ in range(step // GAP):
            seed = projector.next_seed(seed)
        return seed

    monkeypatch.setattr(projectors, "projection_seed", lambda seed, ordinal, step: chain(ordinal, step))
    return apollo, galore


VARIANTS = {  # apollo-torch group options, our preset, its options
    "apollo": (dict(rank=4, scale=1, scale_type="channel"), fullrank.APOLLO, dict(rank=4)),
    "apollo_mini": (dict(rank=1, scale=128, scale_type="tensor"), fullrank.APOLLO_Mini, dict(rank=1)),
}


@pytest.mark.parametrize("storage", ["seed", "matrix"])  # P regenerated from its seed at every step, or stored
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_apollo_matches_apollo_torch_under_its_adam_convention(apollo_seeds, variant, storage):
    apollo, _ = apollo_seeds
    theirs_options, preset, ours_options = VARIANTS[variant]

    def theirs(ps):
        return apollo.AdamW([{"params": ps[:2], "update_proj_gap": GAP, "proj_type": "std", "proj": "random",
                              **theirs_options}, {"params": ps[2:]}], lr=LR, eps=1e-6, weight_decay=0.1)

    def ours(ps):
        return preset([{"params": ps[:2], "update_proj_gap": GAP, **ours_options}, {"params": ps[2:]}],
                      lr=LR, eps=1e-6, weight_decay=0.1, adam_convention="transformers", projection_storage=storage)

    diff, tol, moved = compare(theirs, ours)
    assert diff <= tol, (diff, tol)
    assert moved > 1000 * tol  # the comparison is not vacuous


def test_apollo_with_torch_convention_differs_only_through_the_limiter(apollo_seeds):
    """Without the limiter the two Adam conventions differ only by ε·(1 − √(1 − β2ᵗ)) next to √V
    (inner_adam.py): below fp32 rounding for ε = 1e-8. With it, the limiter sees c_t in one and not the
    other, and the runs part."""
    apollo, _ = apollo_seeds
    group = dict(rank=4, update_proj_gap=GAP)

    def theirs(disable_nl):
        return lambda ps: apollo.AdamW([{"params": ps[:2], "proj_type": "std", "proj": "random", "scale": 1,
                                         "scale_type": "channel", **group}, {"params": ps[2:]}],
                                       lr=LR, eps=1e-8, disable_nl=disable_nl)

    def ours(limiter):
        return lambda ps: fullrank.APOLLO([{"params": ps[:2], **group}, {"params": ps[2:]}], lr=LR, eps=1e-8,
                                          limiter=limiter)

    diff, tol, _ = compare(theirs(True), ours("none"))
    assert diff <= tol, (diff, tol)
    diff, tol, _ = compare(theirs(False), ours("norm_growth"))
    assert diff > 100 * tol, (diff, tol)


def test_galore_keep_matches_the_official_galore_adamw(apollo_seeds):
    """apollo-torch ships GaLore's official AdamW and SVD projector (galore-torch 1.0): moments kept
    across refreshes, the transformers Adam convention."""
    _, galore = apollo_seeds

    def theirs(ps):
        return galore.AdamW([{"params": ps[:2], "rank": 4, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"},
                             {"params": ps[2:]}], lr=LR, eps=1e-6, weight_decay=0.1)

    def ours(ps):
        return fullrank.GaLore([{"params": ps[:2], "rank": 4, "update_proj_gap": GAP}, {"params": ps[2:]}],
                               lr=LR, eps=1e-6, weight_decay=0.1, on_switch="keep", adam_convention="transformers")

    diff, tol, moved = compare(theirs, ours)
    assert diff <= tol and moved > 1000 * tol, (diff, tol, moved)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_apollo_updates_match_apollo_torch_to_1e_5(apollo_seeds, variant):
    """As tests/test_peers.py does for fira and galore-torch: every step's update of each projected
    matrix, ‖ΔW_ours − ΔW_theirs‖ / ‖ΔW_theirs‖ < 1e-5 over 12 steps with redraws at steps 0, 5, 10
    (small W₀, so fp32 rounding of W does not dominate ΔW)."""
    apollo, _ = apollo_seeds
    theirs_options, preset, ours_options = VARIANTS[variant]
    init = [0.01 * torch.randn(s, generator=torch.Generator().manual_seed(7 + k)) for k, s in enumerate(SHAPES)]
    theirs = [nn.Parameter(x.clone()) for x in init]
    ours = [nn.Parameter(x.clone()) for x in init]
    a = apollo.AdamW([{"params": theirs[:2], "update_proj_gap": GAP, "proj_type": "std", "proj": "random",
                       **theirs_options}, {"params": theirs[2:]}], lr=LR, eps=1e-6, weight_decay=0.1)
    b = preset([{"params": ours[:2], "update_proj_gap": GAP, **ours_options}, {"params": ours[2:]}],
               lr=LR, eps=1e-6, weight_decay=0.1, adam_convention="transformers")
    errors = []
    for grads in gradient_sequence():
        before = [(p.detach().clone(), q.detach().clone()) for p, q in zip(theirs, ours)]
        for p, q, g in zip(theirs, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for (p0, q0), p, q in list(zip(before, theirs, ours))[:2]:
            d_theirs, d_ours = p.detach() - p0, q.detach() - q0
            errors.append(((d_ours - d_theirs).norm() / d_theirs.norm()).item())
    assert max(errors) < 1e-5, ["%.1e" % e for e in errors]
