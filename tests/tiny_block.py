"""A micro model for optimizer tests (no tests here): a block whose Linear names match
``fullrank.param_groups``' default targets (self_attn, mlp), a regression task and a training loop."""
from __future__ import annotations

import io
import tempfile

import pytest
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


def through_checkpoint(obj):
    """``obj`` saved with ``torch.save`` and loaded back with ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_resume_is_exact(build, before: int, after: int, data, check=None) -> None:
    """Training a Tiny ``before`` steps, resuming it from a checkpoint loaded with ``weights_only=True``
    into a fresh model and optimizer (``build(model)``) and training ``after`` more gives the weights of
    ``before + after`` uninterrupted steps, bit for bit. ``check(optimizer)`` must hold of the resumed one."""
    straight = Tiny(seed=2)
    train_tiny(straight, build(straight), before + after, data)
    first = Tiny(seed=2)
    opt = build(first)
    train_tiny(first, opt, before, data)
    saved = through_checkpoint({"model": first.state_dict(), "opt": opt.state_dict()})
    resumed = Tiny(seed=9)
    resumed.load_state_dict(saved["model"])
    opt = build(resumed)
    opt.load_state_dict(saved["opt"])
    assert check is None or check(opt)
    train_tiny(resumed, opt, after, data)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def assert_step_refused_on_fsdp2(method: str, match: str) -> None:
    """``method``'s step on a ``fully_shard``-ed Tiny (a 1-process gloo group) raises a ValueError
    matching ``match`` and changes no weight."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    from torch.distributed.fsdp import fully_shard

    import fullrank

    with tempfile.NamedTemporaryFile() as init:
        dist.init_process_group("gloo", init_method=f"file://{init.name}", rank=0, world_size=1)
        try:
            model = Tiny(seed=4)
            fully_shard(model)
            opt = fullrank.make_optimizer(method, fullrank.param_groups(model, rank=4))
            before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
            x, y = tiny_data(3)
            (model(x) - y).square().mean().backward()
            with pytest.raises(ValueError, match=match):
                opt.step()
            assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
        finally:
            dist.destroy_process_group()
