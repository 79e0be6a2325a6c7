"""A layer-wise run resumed from its state dict goes on exactly when the convergence trigger
(AdaRankGrad's ``refresh_threshold``) had asked the next step for refreshes: the wrapper reads the
flags again from the loaded state."""
import copy

import torch

import fullrank
from tiny_block import Tiny, tiny_data


def _layerwise(model):
    make = lambda groups: fullrank.make_optimizer("adarankgrad", groups, lr=1e-2, refresh_threshold=0.9)  # noqa: E731
    return fullrank.layerwise(model, make, fullrank.param_groups(model, rank=4, update_proj_gap=50))


def _step(model, opt, data):
    x, y = data
    (model(x) - y).square().mean().backward()
    opt.step()


def test_layerwise_resume_keeps_the_refreshes_the_trigger_asked_for():
    model = Tiny()
    opt = _layerwise(model)
    for step in range(4):
        _step(model, opt, tiny_data(step))
    assert opt._flagged  # the state saved below asks the next step for refreshes
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    twin = Tiny(seed=5)
    twin.load_state_dict(saved["model"])
    restored = _layerwise(twin)
    restored.load_state_dict(saved["opt"])
    for step in range(4, 7):
        for m, o in ((model, opt), (twin, restored)):
            _step(m, o, tiny_data(step))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
