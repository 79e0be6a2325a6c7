"""pytorch-optimizer's GaLore and Fira (a ``bench/peers.py`` peer) against ours: the same updates under its
conventions while P is fixed, and its refresh schedule, one step earlier than ours (docs/benchmarks.md)."""
import pytest
import torch

import fullrank

po = pytest.importorskip("pytorch_optimizer")

SHAPE, RANK, STEPS = (24, 16), 4, 8


def _grads(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g, dtype=torch.float64) * (1 + t % 3) for t in range(STEPS)]


def _pair(name, gap):
    """(theirs, ours, their weight, our weight, start): ours under pytorch-optimizer's conventions."""
    start = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs_w, ours_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    theirs = getattr(po, name)([{"params": [theirs_w], "rank": RANK, "update_proj_gap": gap, "scale": 0.25,
                                 "projection_type": "std"}], lr=1e-2, weight_decay=0.1)
    extra = {"residual_convention": "official"} if name == "Fira" else {}
    ours = fullrank.make_optimizer(name.lower(), [{"params": [ours_w], "rank": RANK, "update_proj_gap": gap}], lr=1e-2,
                                   weight_decay=0.1, eps=1e-6, adam_convention="transformers", **extra)
    return theirs, ours, theirs_w, ours_w, start


@pytest.mark.parametrize("name", ["GaLore", "Fira"])
def test_same_updates_under_its_conventions_while_p_is_fixed(name):
    theirs, ours, theirs_w, ours_w, start = _pair(name, gap=100)
    for G in _grads():
        theirs_w.grad, ours_w.grad = G.clone(), G.clone()
        theirs.step()
        ours.step()
    moved = (ours_w - start).abs().max().item()
    assert moved > 1e-2
    assert (theirs_w - ours_w).abs().max().item() < 1e-6 * max(1.0, moved) + 1e-7  # (its SVD runs in fp32)


def test_it_refreshes_one_step_earlier_than_we_do():
    """With T = 3 its P changes at steps 1, 3, 6 (1-based step % T == 0), ours at 1, 4, 7."""
    theirs, ours, theirs_w, ours_w, _ = _pair("GaLore", gap=3)
    changed = {"theirs": [], "ours": []}
    previous = {"theirs": None, "ours": None}
    for t, G in enumerate(_grads(), start=1):
        theirs_w.grad, ours_w.grad = G.clone(), G.clone()
        theirs.step()
        ours.step()
        now = {"theirs": theirs.state[theirs_w]["projector"].ortho_matrix.clone(), "ours": ours.state[ours_w]["proj_right"].clone()}
        for k in now:
            if previous[k] is None or not torch.equal(previous[k], now[k]):
                changed[k].append(t)
            previous[k] = now[k]
    assert changed == {"theirs": [1, 3, 6], "ours": [1, 4, 7]}
