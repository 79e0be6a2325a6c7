"""Every preset steps under FakeTensorMode (what ``fullrank.memory.trace`` runs), the layer-wise path
included, and the state it allocates there has the shapes a real step allocates."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import fullrank

PROJECTED = [m for m in fullrank.optimizer_methods() if m not in ("adamw", "adamw8bit", "flora", "sgd")]


def _model(dtype=torch.float32):
    return nn.Sequential(nn.Linear(24, 40, bias=False, dtype=dtype), nn.Tanh(),
                         nn.Linear(40, 24, bias=False, dtype=dtype), nn.Linear(24, 3, dtype=dtype))


def _groups(model):
    return [{"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 1},
            {"params": list(model[3].parameters())}]


def _train(model, opt, steps=2):
    for _ in range(steps):
        model(torch.randn(5, 24)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _shapes(opt):
    return {k: tuple(v.shape) for state in opt.state.values() for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", fullrank.optimizer_methods())
def test_every_method_steps_under_fake_tensors_with_the_real_state_shapes(method):
    torch.manual_seed(0)
    real_model = _model()
    real = fullrank.make_optimizer(method, _groups(real_model), lr=1e-3)
    _train(real_model, real)
    with FakeTensorMode():
        fake_model = _model()
        fake = fullrank.make_optimizer(method, _groups(fake_model), lr=1e-3)
        _train(fake_model, fake)
        assert all(is_fake(v) for s in fake.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if method in ("adarankgrad", "fira_adaptive"):  # a fake spectrum reads as the most memory: max_rank
        assert set(fake.current_ranks().values()) == {4}
    else:
        assert _shapes(fake) == _shapes(real)


@pytest.mark.parametrize("method", PROJECTED[:2] + ["adarankgrad", "apollo"])
def test_layerwise_steps_under_fake_tensors(method):
    with FakeTensorMode():
        model = _model()
        opt = fullrank.layerwise(model, lambda g: fullrank.make_optimizer(method, g, lr=1e-3), _groups(model))
        _train(model, opt)
    assert opt.optimizer.skipped_steps == 0
    assert set(fullrank.SubspaceAdamW.current_ranks(opt.optimizer).values()) == {4}


@pytest.mark.parametrize("method", ["fira", "adamw8bit", "apollo_mini"])
def test_8bit_states_and_stochastic_rounding_step_under_fake_tensors(method):
    """The memory tracer's 7B recipes: bf16 weights, 8-bit moments, stochastic rounding, layer-wise."""
    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(256, 192, bias=False, dtype=torch.bfloat16), nn.Tanh(),
                              nn.Linear(192, 256, bias=False, dtype=torch.bfloat16), nn.Linear(256, 40, dtype=torch.bfloat16))
        groups = [{"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 1},
                  {"params": list(model[3].parameters())}]
        opt = fullrank.layerwise(model, lambda g: fullrank.make_optimizer(method, g, lr=1e-3, states="8bit",
                                                                          stochastic_rounding=True), groups)
        for _ in range(2):
            model(torch.randn(5, 256, dtype=torch.bfloat16)).float().square().mean().backward()
            opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.state[model[3].weight]["exp_avg"].dtype == torch.uint8
