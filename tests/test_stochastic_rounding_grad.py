"""Stochastic rounding of bf16 weights leaves the caller's gradient as it was: a one-matrix bucket (the
CPU default) is a view of ``param.grad``, and the update assembled for a writer with a working copy
must not be built in it."""
import pytest
import torch
from torch import nn

import fullrank


@pytest.mark.parametrize("method", ["fira", "galore", "apollo"])
def test_stochastic_rounding_step_leaves_param_grad_unchanged(method):
    torch.manual_seed(0)
    matrices = [nn.Parameter(torch.randn(48, 64).to(torch.bfloat16)) for _ in range(2)]
    bias = nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = fullrank.make_optimizer(method, [{"params": matrices, "rank": 8, "update_proj_gap": 2}, {"params": [bias]}],
                                  lr=1e-2, stochastic_rounding=True)
    for step in range(3):
        grads = [torch.randn_like(p) for p in (*matrices, bias)]
        for p, g in zip((*matrices, bias), grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in (*matrices, bias)]
        opt.step()
        for p, g, w in zip((*matrices, bias), grads, before):
            assert torch.equal(p.grad, g), (method, step)
            assert not torch.equal(p.detach(), w)  # (the step did write the weights)
