"""Convergence-triggered refresh, the step's device reads, and bit-identical resumes with changing ranks."""
import io

import pytest
import torch
from torch import nn

import fullrank
from fullrank.optim.units.schedule import stacked_energy


def orthonormal(rows, cols, seed):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)).Q


def two_subspace_gradients():
    """A (rank 2) and B (rank 2) with orthogonal row spaces, for a 20×12 weight (right projection)."""
    V = orthonormal(12, 4, seed=0)
    U = orthonormal(20, 4, seed=1)
    A = U[:, :2] @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ V[:, :2].T
    B = U[:, 2:] @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ V[:, 2:].T
    return A, B, V[:, :2], V[:, 2:]


def run(gradients, **options):
    W = nn.Parameter(torch.zeros(20, 12, dtype=torch.float64))
    opt = fullrank.GaLore([{"params": [W], "rank": 2}], lr=1e-3, **options)
    history = []
    for G in gradients:
        W.grad = G.clone()
        opt.step()
        state = opt.state[W]
        energy = state.get("captured_energy")
        history.append((state.get("last_refresh"), state["proj_right"].clone(),
                        None if energy is None else energy.item()))
    return opt, W, history


def spans(proj_right, basis):
    """The rows of proj_right span the columns of basis."""
    return torch.allclose(proj_right.T @ proj_right, basis @ basis.T, atol=1e-10)


def test_captured_energy_is_the_share_of_the_gradient_in_the_subspace():
    """``stacked_energy`` (what the step records) from the norms ‖R‖ and ‖G‖ of a stack of matrices."""
    A, B, VA, _ = two_subspace_gradients()
    P = VA.T  # right projection onto A's row space
    zero = torch.zeros(20, 12, dtype=torch.float64)
    grads = torch.stack([A, B, A + B, zero])
    low = grads @ P.T
    energy = stacked_energy(torch.linalg.vector_norm(low, dim=(-2, -1)), torch.linalg.vector_norm(grads, dim=(-2, -1)))
    assert energy.tolist() == pytest.approx([1.0, 0.0, 13 / 26, 1.0], abs=1e-12)


def test_refresh_fires_when_the_subspace_stops_capturing_the_gradient():
    A, B, VA, VB = two_subspace_gradients()
    grads = [A] * 5 + [B] * 5  # the gradient leaves span(P) at step 5 (0-based)
    _, _, history = run(grads, update_proj_gap=100, refresh_threshold=0.3, refresh_beta=0.5)
    # ē: 1, 1, 1, 1, 1, 0.5, 0.25 (< 0.3, read at the next step) → refresh at step 7 with G = B,
    # where the average restarts from the new subspace's share (B lies in it: 1)
    assert [last for last, *_ in history] == [0, 0, 0, 0, 0, 0, 0, 7, 7, 7]
    assert [energy for *_, energy in history] == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.25, 1, 1, 1], abs=1e-12)
    assert spans(history[6][1], VA) and spans(history[7][1], VB)

    _, _, fixed = run(grads, update_proj_gap=100)  # τ = 0: GaLore's fixed gap, no trigger state
    assert all(last is None for last, *_ in fixed) and spans(fixed[-1][1], VA)


def test_update_proj_gap_stays_an_upper_bound_and_counts_from_the_last_refresh():
    A, B, _, _ = two_subspace_gradients()
    _, _, history = run([A] * 8, update_proj_gap=3, refresh_threshold=0.5)
    assert [last for last, *_ in history] == [0, 0, 0, 3, 3, 3, 6, 6]
    # a triggered refresh at step 7 moves the next forced one to step 7 + 4
    _, _, history = run([A] * 5 + [B] * 7, update_proj_gap=4, refresh_threshold=0.3, refresh_beta=0.5)
    assert [last for last, *_ in history] == [0, 0, 0, 0, 4, 4, 4, 7, 7, 7, 7, 11]


def test_one_device_read_per_step_and_one_more_when_adaptive_ranks_are_chosen(monkeypatch):
    reads = []
    for method in ("tolist", "item", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _name=method, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    params = [nn.Parameter(torch.zeros(16, 10)), nn.Parameter(torch.zeros(10, 16)), nn.Parameter(torch.zeros(7))]
    opt = fullrank.FiraAdaptive([{"params": params[:2], "rank": 4, "update_proj_gap": 3}, {"params": params[2:]}])
    g = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        reads.clear()
        opt.step()
        per_step.append(list(reads))
        assert opt.rank_summary()["max"] <= 4 and reads == per_step[-1]  # the summary reads nothing
    # steps 0 and 3 recompute the subspaces (adaptive ranks: one more read), 1 and 2 do not
    assert per_step == [["tolist", "tolist"], ["tolist"], ["tolist"], ["tolist", "tolist"]]


class TinyLM(nn.Module):
    def __init__(self, d=16, hidden=24, vocab=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h)
        return self.head(h + self.mlp(h))


def train(model, opt, steps, start, ranks=None):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(500 + s)
        ids, target = torch.randint(0, 40, (8, 6), generator=g), torch.randint(0, 40, (8, 6), generator=g)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ranks is not None:
            ranks.append(dict(opt.rank_summary()["ranks"]))


PRESET_OPTIONS = {
    "adarankgrad": dict(rank_energy=0.6, refresh_threshold=0.5),
    "fira_adaptive": dict(rank_energy=0.6, refresh_threshold=0.5),
    "apollo": {},
}


@pytest.mark.parametrize("method", list(PRESET_OPTIONS))
def test_resume_with_changed_ranks_is_bit_identical(method):
    def make(model):
        groups = fullrank.param_groups(model, rank=6, target_modules=["attn", "mlp"], update_proj_gap=3)
        return fullrank.make_optimizer(method, groups, lr=0.01, **PRESET_OPTIONS[method])

    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model)
    ranks = []
    train(model, opt, 6, start=0, ranks=ranks)
    if method != "apollo":  # the run really changed ranks before the checkpoint
        assert any(len({r[name] for r in ranks}) > 1 for name in ranks[0]), ranks
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    after = []
    train(model, opt, 5, start=6, ranks=after)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyLM()
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.rank_summary() == dict(fullrank.optim.units.rank.summarize(ranks[-1]))
    after2 = []
    train(resumed, opt2, 5, start=6, ranks=after2)
    assert after == after2
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_own_dtype_state_survives_a_bf16_resume():
    W = nn.Parameter(torch.randn(12, 8, dtype=torch.bfloat16))
    opt = fullrank.FiraAdaptive([{"params": [W], "rank": 4}])
    W.grad = torch.randn(12, 8, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[W]["captured_energy"].dtype == torch.float32
    W2 = nn.Parameter(W.detach().clone())
    opt2 = fullrank.FiraAdaptive([{"params": [W2], "rank": 4}])
    opt2.load_state_dict(opt.state_dict())
    for key in ("captured_energy", "residual_norm"):
        assert opt2.state[W2][key].dtype == torch.float32
        assert torch.equal(opt2.state[W2][key], opt.state[W][key])
