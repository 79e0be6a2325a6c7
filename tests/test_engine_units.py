"""Units that own their state, used from outside the engine: a limiter with state of its own registered
from this file (it trains, is reset at a subspace switch and round-trips through a state dict), APOLLO's
P stored or regenerated from its seed, and a weight writer registered from this file; each checked
against a plain loop written from the equations (tests/reference.py) or against the other variant."""
import copy

import pytest
import torch

import fullrank
from fullrank.memory import optimizer_state_bytes
from fullrank.optim.base.options import Option, number
from fullrank.optim.base.units import scalar_state
from fullrank.optim.units import limiters, weights
from reference import PHI_EPS, down, side_of, top_subspace, up

KEY = "test_mean_norm"


class MeanNormCap(limiters.Limiter):
    """A toy limiter with state: ‖S_t‖ capped at ``test_norm_ratio`` times the running mean m of the
    limited norms, m ← β·m + (1 − β)·c·‖S_t‖ (m starts at the first limited norm); m starts over
    whenever the matrix gets a new subspace."""

    name = "test_mean_norm"
    options = {"test_norm_ratio": Option(1.1, number(1.0), "cap on ‖S‖ / m"),
               "test_norm_beta": Option(0.5, number(0.0, 1.0, high_open=True), "β of m")}
    state = {KEY: scalar_state}

    def limit(self, norms, state, values):
        mean = state[KEY].to(norms.dtype)
        factor = torch.where(mean > 0, (values.test_norm_ratio * mean / norms).clamp_max(1.0), 1.0)
        limited = norms * factor
        beta = values.test_norm_beta
        return factor, {KEY: torch.where(mean > 0, beta * mean + (1 - beta) * limited, limited)}

    def at_switch(self, state, values):
        state.pop(KEY, None)


@pytest.fixture
def mean_norm_limiter():
    limiters.register_limiter("test_mean_norm", MeanNormCap())
    yield
    limiters.LIMITER_REGISTRY.pop("test_mean_norm")


SHAPES = [(12, 7), (6, 11)]
RANK, GAP, LR, ALPHA, RATIO, BETA = 3, 3, 0.05, 0.25, 1.1, 0.5


def _gradients(steps):
    g = torch.Generator().manual_seed(4)
    scales = [1.0, 1.6, 0.8, 2.5, 2.7, 0.6, 3.0, 1.2, 2.0]  # jumps: the cap binds at some steps and not at others
    return [[torch.randn(s, generator=g, dtype=torch.float64) * scales[t % len(scales)] for s in SHAPES]
            for t in range(steps)]


def _starts():
    return [torch.randn(s, generator=torch.Generator().manual_seed(20 + k), dtype=torch.float64)
            for k, s in enumerate(SHAPES)]


def _engine(params):
    return fullrank.SubspaceAdamW([{"params": params, "rank": RANK, "update_proj_gap": GAP}], lr=LR, scale=ALPHA,
                                  residual="scale_matrix", limiter="test_mean_norm", test_norm_ratio=RATIO,
                                  test_norm_beta=BETA)


def _reference(W0, grads, reset_at_switch=True):
    """Fira-matrix (eq. 10) under the toy limiter, from the equations; m's history of limited norms."""
    W, M, V, mean, kept = W0.clone(), None, None, 0.0, []
    side = side_of("std", W0.shape)
    for t, G in enumerate(grads, start=1):
        if (t - 1) % GAP == 0:
            left, right = top_subspace(G, RANK, side)
            mean = 0.0 if reset_at_switch else mean
        R = down(G, left, right)
        M = 0.1 * R if M is None else 0.9 * M + 0.1 * R
        V = 0.001 * R * R if V is None else 0.999 * V + 0.001 * R * R
        psi = (M / (1 - 0.9**t)) / ((V / (1 - 0.999**t)).sqrt() + 1e-8)
        phi = psi.norm() / (R.norm() + PHI_EPS)
        S = phi * (G - up(R, left, right))
        c = min(1.0, RATIO * mean / S.norm().item()) if mean > 0 else 1.0
        mean = BETA * mean + (1 - BETA) * c * S.norm().item() if mean > 0 else c * S.norm().item()
        kept.append(mean)
        W = W - LR * (ALPHA * up(psi, left, right) + c * S)
    return W, kept


def test_a_limiter_with_its_own_state_trains_switches_and_round_trips(mean_norm_limiter):
    steps, cut = 8, 5  # refreshes at steps 1, 4, 7: two switches, one of them after the cut
    grads = _gradients(steps)
    params = [torch.nn.Parameter(w.clone()) for w in _starts()]
    opt = _engine(params)
    history = []
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
        history.append([opt.state[p][KEY].item() for p in params])
        if t == cut - 1:
            saved, weights_at_cut = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    for k, (W0, p) in enumerate(zip(_starts(), params)):
        seq = [grads[t][k] for t in range(steps)]
        expected, kept = _reference(W0, seq)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-9)
        assert [h[k] for h in history] == pytest.approx(kept, rel=1e-9)
        without_reset, _ = _reference(W0, seq, reset_at_switch=False)
        assert (without_reset - expected).abs().max() > 1e-6  # the switch's reset shows in the weights
        assert opt.state[p][KEY].dtype == torch.float64
    resumed = [torch.nn.Parameter(w) for w in weights_at_cut]
    again = _engine(resumed)
    again.load_state_dict(saved)
    for t in range(cut, steps):
        for p, g in zip(resumed, grads[t]):
            p.grad = g.clone()
        again.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p][KEY], again.state[q][KEY])


def test_a_limiter_state_is_made_only_where_a_limiter_keeps_one():
    """The limiter's state is its own: Fira's norm-growth limiter keeps one norm per matrix, GaLore's
    (none) nothing."""
    W = torch.nn.Parameter(torch.randn(10, 6))
    for preset, keys in ((fullrank.Fira, {"residual_norm"}), (fullrank.GaLore, set())):
        opt = preset([{"params": [W], "rank": 2}])
        W.grad = torch.randn(10, 6)
        opt.step()
        assert set(opt.state[W]) - {"step", "adam_step", "exp_avg", "exp_avg_sq", "proj_right"} == keys


# ------------------------------------------------------------------ APOLLO's P, stored or regenerated
APOLLO_SHAPES = [(24, 16), (12, 20), (24, 16)]


def _apollo_run(storage, steps=7, bucket_cap_mb=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in APOLLO_SHAPES]
    opt = fullrank.APOLLO([{"params": params, "rank": 4, "update_proj_gap": 3}], lr=0.01, weight_decay=0.1,
                          projection_storage=storage, bucket_cap_mb=bucket_cap_mb)
    for t in range(steps):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + t % 3)).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("bucket_cap_mb", [0.0, 256.0])  # one matrix per bucket; stacked same-shape matrices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apollo_stored_p_equals_the_regenerated_one(bucket_cap_mb, dtype):
    """projection_storage='matrix' keeps the Gaussian P the seed regenerates: the same draws, so the same
    updates (bit for bit), for r·min(m, n) more elements of state per matrix."""
    seeded, seeded_opt = _apollo_run("seed", bucket_cap_mb=bucket_cap_mb, dtype=dtype)
    stored, stored_opt = _apollo_run("matrix", bucket_cap_mb=bucket_cap_mb, dtype=dtype)
    for p, q in zip(seeded, stored):
        assert torch.equal(p, q)
        a, b = seeded_opt.state[p], stored_opt.state[q]
        assert "proj_seed" in a and "proj_left" not in a and "proj_right" not in a
        assert "proj_seed" not in b and ("proj_left" in b) != ("proj_right" in b)
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    extra = sum(4 * min(s) for s in APOLLO_SHAPES) * torch.finfo(dtype).bits // 8
    assert optimizer_state_bytes(stored_opt) - optimizer_state_bytes(seeded_opt) == extra


def test_a_seed_checkpoint_continues_identically_with_stored_p():
    """A checkpoint that holds seeds (the default) loads into an optimizer that stores P (where P lives
    is the loading optimizer's choice, as ``states`` is): the seeds become their P, and the run
    continues as the seeded one does."""
    params, opt = _apollo_run("seed", steps=4)
    saved, start = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    runs = []
    for storage in ("seed", "matrix"):
        ps = [torch.nn.Parameter(w.clone()) for w in start]
        o = fullrank.APOLLO([{"params": ps, "rank": 4, "update_proj_gap": 3}], lr=0.01, weight_decay=0.1,
                            projection_storage=storage)
        o.load_state_dict(copy.deepcopy(saved))  # (a loaded state holds the dict's tensors: one copy each)
        for t in range(4, 8):
            gen = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (1 + t % 3)
            o.step()
        runs.append((ps, o))
    (seeded, _), (stored, stored_opt) = runs
    assert all(torch.equal(p, q) for p, q in zip(seeded, stored))
    assert all("proj_seed" not in stored_opt.state[q] for q in stored)


def test_a_stored_p_checkpoint_is_refused_by_a_seeded_group_with_the_option_named():
    params, opt = _apollo_run("matrix", steps=2)
    again = fullrank.APOLLO([{"params": params, "rank": 4, "update_proj_gap": 3}], projection_storage="seed")
    with pytest.raises(ValueError, match="projection_storage='matrix'"):
        again.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ a weight writer from outside
class HalfInFloat32(weights.WeightWriter):
    """fp16 weights updated in fp32 working copies and rounded back to nearest."""

    name = "test_half_in_float32"
    in_place = False
    calls = 0

    def accepts(self, dtype, stochastic_rounding):
        return dtype == torch.float16

    def working_copy(self, weight):
        return weight.float()

    def write_back(self, weight, work, generator):
        weight.copy_(work)

    def write_stack(self, params, update, step_sizes, decay, keep=None, generators=None):
        HalfInFloat32.calls += 1
        work = [self.working_copy(p) for p in params]
        super().write_stack(work, update.float(), step_sizes, decay, keep)
        for param, value in zip(params, work):
            self.write_back(param, value, None)


@pytest.fixture
def half_writer():
    weights.WEIGHT_WRITERS.register(HalfInFloat32())
    yield
    weights.WEIGHT_WRITERS.pop("test_half_in_float32")


def test_a_weight_writer_registered_from_a_test_file(half_writer):
    """GaLore on fp16 weights goes through the registered writer at every step (each step's
    W·decay − η·update formed in fp32, rounded once) and follows a plain fp32 loop to fp16 rounding."""
    shape, steps = (10, 6), 5
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).half()
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(10 + t)).half() for t in range(steps)]
    W = torch.nn.Parameter(W0.clone())
    HalfInFloat32.calls = 0
    opt = fullrank.GaLore([{"params": [W], "rank": 2, "update_proj_gap": 2}], lr=0.1, scale=1.0, weight_decay=0.1)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    ref, M, V = W0.clone(), None, None
    for t, G in enumerate(grads, start=1):
        if (t - 1) % 2 == 0:
            _, right = top_subspace(G.float(), 2, "right")
            right = right.half()
        R = (G @ right.T).float()
        M = 0.1 * R if M is None else 0.9 * M + 0.1 * R
        V = 0.001 * R * R if V is None else 0.999 * V + 0.001 * R * R
        psi = ((M / (1 - 0.9**t)) / ((V / (1 - 0.999**t)).sqrt() + 1e-8)).half()
        ref = (ref.float() * (1 - 0.1 * 0.1) - 0.1 * (psi @ right).float()).half()
    assert HalfInFloat32.calls == steps
    tolerance = 2 * steps * torch.finfo(torch.float16).eps * W0.float().abs().max().item()  # two ulps a step
    assert (W.detach().float() - ref.float()).abs().max().item() <= tolerance
    assert (W.detach().float() - W0.float()).abs().max().item() > 10 * tolerance  # the weights moved
