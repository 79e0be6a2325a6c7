"""A micro model for optimizer tests (no tests here): a block whose Linear names match
``fullrank.param_groups``' default targets (self_attn, mlp), a regression task and a training loop."""
from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """A micro block whose Linear names match ``param_groups``' targets (self_attn, mlp)."""

    def __init__(self, width=16, hidden=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, width)
        self.self_attn = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.Tanh(), nn.Linear(hidden, width, bias=False))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + self.self_attn(h)
        h = h + self.mlp(h)
        return self.head(h).sum(-1)


def tiny_data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x @ torch.randn(6, generator=g))


def train_tiny(model, opt, steps, data):
    """Losses of ``steps`` full-batch steps on ``data``."""
    x, y = data
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
