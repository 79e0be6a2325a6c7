"""SCALE (Glentis et al., arXiv 2506.16659) against a reference loop written from Algorithm 1.

No official package exists (the authors' code, OptimAI-Lab/Minimalist_LLM_Pretraining, is a training
repository, not an installable package), so there is no update-for-update test against one.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fullrank
from fullrank.memory import optimizer_state_bytes
from fullrank.optim import NonFiniteGradientError, make_optimizer, param_groups
from fullrank.optim.methods.scale import SCALE
from tiny_block import through_checkpoint

torch.set_num_threads(1)


class Toy(nn.Module):
    """The parameter kinds of a LLaMA: embedding, projected MLP matrices (two of one shape), a norm
    weight, a bias, an lm_head."""

    def __init__(self, vocab=11, hidden=6, inner=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.mlp = nn.ModuleDict({"up": nn.Linear(hidden, inner, bias=False),
                                  "gate": nn.Linear(hidden, inner, bias=True),
                                  "down": nn.Linear(inner, hidden, bias=False)})
        self.norm = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def toy(seed=0, dtype=torch.float64) -> Toy:
    torch.manual_seed(seed)
    model = Toy().to(dtype)
    with torch.no_grad():
        model.norm.add_(0.1 * torch.randn_like(model.norm))
    return model


def random_grads(model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + 5 * k) for k, (n, p) in
             enumerate(model.named_parameters())} for _ in range(steps)]


def reference_scale(weights: dict, grads: list[dict], lrs: list[float], *, lr0: float, momentum: float,
                    betas, eps: float, weight_decay: float, adam_lr: float) -> dict:
    """Algorithm 1 of the paper, one parameter at a time, with the authors' conventions (module doc of
    ``fullrank.optim.scale``): C divides each output feature by its RMS ‖·‖₂/√d; the embedding's
    output features are its columns, a Linear's its rows; momentum on lm_head; Adam (Kingma & Ba,
    Algorithm 1 with the step-size form of their §2) on vectors at lr·adam_lr/lr0."""
    w = {n: t.clone() for n, t in weights.items()}
    m = {n: torch.zeros_like(t) for n, t in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    b1, b2 = betas
    for t, (g_t, lr) in enumerate(zip(grads, lrs), start=1):
        for name in w:
            g = g_t[name]
            if w[name].dim() == 1:
                m[name] = b1 * m[name] + (1 - b1) * g
                v[name] = b2 * v[name] + (1 - b2) * g * g
                step = lr * adam_lr / lr0 * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                w[name] = w[name] * (1 - lr * adam_lr / lr0 * weight_decay) - step * m[name] / (v[name].sqrt() + eps)
                continue
            if "lm_head" in name:  # l = L: m = β·m + (1 − β)·g
                m[name] = momentum * m[name] + (1 - momentum) * g
                d = m[name]
            else:  # m = g
                d = g
            c = torch.empty_like(d)
            if "embed_tokens" in name:  # one feature per column j (hidden unit), over the vocabulary
                for j in range(d.shape[1]):
                    c[:, j] = d[:, j] / max(d[:, j].norm().item() / math.sqrt(d.shape[0]), 1e-8)
            else:  # nn.Linear (out × in): one feature per row i (output unit)
                for i in range(d.shape[0]):
                    c[i, :] = d[i, :] / max(d[i, :].norm().item() / math.sqrt(d.shape[1]), 1e-8)
            w[name] = w[name] * (1 - lr * weight_decay) - lr * c
    return w


def run(opt, model, grads, lrs=None):
    for k, g in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()


@pytest.mark.parametrize("bucket_cap_mb", [None, 1.0])
def test_matches_reference_update_for_update(bucket_cap_mb):
    model = toy()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model, 6)
    lrs = [0.02, 0.02, 0.015, 0.01, 0.005, 0.002]  # a schedule: the vectors' Adam lr follows it
    opt = make_optimizer("scale", param_groups(model, rank=2, target_modules=("mlp",)), lr=0.02,
                         weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, momentum=0.7, adam_lr=0.05,
                         bucket_cap_mb=bucket_cap_mb)
    assert isinstance(opt, SCALE)
    assert opt.roles() == {"mlp.up.weight": "matrix", "mlp.gate.weight": "matrix", "mlp.down.weight": "matrix",
                           "embed_tokens.weight": "embedding", "norm": "vector", "mlp.gate.bias": "vector",
                           "lm_head.weight": "last_layer"}
    expected = dict(w0)
    for k in range(len(grads)):  # compare after every step, not only at the end
        run(opt, model, grads[k:k + 1], lrs[k:k + 1])
        expected = reference_scale(w0, grads[:k + 1], lrs[:k + 1], lr0=0.02, momentum=0.7, betas=(0.8, 0.95),
                                   eps=1e-6, weight_decay=0.1, adam_lr=0.05)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12, msg=f"{n} at step {k + 1}")


def test_momentum_only_on_the_last_layer():
    model = toy(dtype=torch.float32)
    opt = make_optimizer("scale", param_groups(model, rank=2, target_modules=("mlp",)), lr=1e-3)
    run(opt, model, random_grads(model, 2))
    state_keys = {n: sorted(opt.state[p]) for n, p in model.named_parameters()}
    assert state_keys == {"embed_tokens.weight": ["step"], "mlp.up.weight": ["step"], "mlp.gate.weight": ["step"],
                          "mlp.down.weight": ["step"], "mlp.gate.bias": ["exp_avg", "exp_avg_sq", "step"],
                          "norm": ["exp_avg", "exp_avg_sq", "step"], "lm_head.weight": ["exp_avg", "step"]}
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())  # a plain int: no memory
    vectors = model.norm.numel() + model.mlp["gate"].bias.numel()
    assert optimizer_state_bytes(opt) == 4 * (model.lm_head.weight.numel() + 2 * vectors)
    assert optimizer_state_bytes(opt, [model.mlp["up"].weight, model.embed_tokens.weight]) == 0
    # without momentum on the last layer (β = 0) the update is the normalised gradient itself
    p = nn.Parameter(torch.randn(3, 4))
    q = SCALE([{"params": [p], "param_names": ["lm_head.weight"]}], lr=0.1, momentum=0.0)
    w, g = p.detach().clone(), torch.randn(3, 4)
    p.grad = g.clone()
    q.step()
    torch.testing.assert_close(p.detach(), w - 0.1 * g / g.pow(2).mean(1, keepdim=True).sqrt())


def tiny_llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=88, num_attention_heads=2,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def test_memory_against_adamw():
    model = tiny_llama()
    params = dict(model.named_parameters())
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    scale = make_optimizer("scale", param_groups(model, rank=4), lr=1e-3)
    adamw = make_optimizer("adamw", param_groups(model, rank=4), lr=1e-3)
    scale.step()
    adamw.step()
    n = sum(p.numel() for p in params.values())
    vectors = sum(p.numel() for p in params.values() if p.dim() == 1)
    assert optimizer_state_bytes(scale) == 4 * (params["lm_head.weight"].numel() + 2 * vectors)
    assert optimizer_state_bytes(adamw) == 4 * 2 * n + 4 * len(params)  # + AdamW's step tensors
    assert optimizer_state_bytes(scale) < 0.3 * optimizer_state_bytes(adamw)


def test_memory_is_the_papers_35_to_45_percent_of_adam():
    """Weights + states (bf16) of SCALE on LLaMA 60M–1B: the paper's figures (0.15, 0.32, 0.80,
    2.81 GB, its 60M–1B results table), 35–45 % of Adam's (weights + two moments). Counted from the
    roles on meta models."""
    from transformers import LlamaForCausalLM

    from fullrank.train.models import model_config

    paper = {"llama_60m": 0.15, "llama_130m": 0.32, "llama_350m": 0.80, "llama_1b": 2.81}
    for name, gb in paper.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config(name))
        params = dict(model.named_parameters())
        opt = make_optimizer("scale", param_groups(model, rank=8), lr=1e-3)
        per_role = {"matrix": 0, "embedding": 0, "last_layer": 1, "vector": 2}
        states = sum(params[n].numel() * per_role[r] for n, r in opt.roles().items())
        weights = sum(p.numel() for p in params.values())
        assert round((weights + states) * 2 / 1e9, 2) == gb, name
        assert 0.345 <= (weights + states) / (3 * weights) <= 0.45, name


def test_bad_options_give_clear_errors():
    p = [nn.Parameter(torch.zeros(4, 4))]
    cases = [(dict(lr=-1.0), r"lr must be a number in \[0.0, inf\], got -1.0"),
             (dict(momentum=1.0), r"momentum must be a number in \[0.0, 1.0\), got 1.0"),
             (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0.0, 1.0\)"),
             (dict(betas=0.9), "betas must be a pair"),
             (dict(eps=-1e-8), "eps must be"),
             (dict(weight_decay=-0.1), "weight_decay must be"),
             (dict(adam_lr=-1.0), "adam_lr must be"),
             (dict(norm_eps=0.0), r"norm_eps must be a number in \(0.0, inf\]"),
             (dict(nonfinite="ignore"), "nonfinite must be one of"),
             (dict(bucket_cap_mb=-1.0), "bucket_cap_mb must be"),  # (0: one matrix per bucket, as in the engine)
             (dict(last_layer=[""]), "last_layer must be a list of non-empty"),
             (dict(embedding=3), "embedding must be a list of non-empty"),
             (dict(states="8bit"), "states='8bit' is not available for SCALE")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            SCALE(p, **options)
    with pytest.raises(ValueError, match="momentum must be"):  # a group's own option is checked too
        SCALE([{"params": p, "momentum": -0.5}])
    with pytest.raises(ValueError, match="states='8bit' is not available for SCALE"):
        make_optimizer("scale", p, states="8bit")
    with pytest.raises(RuntimeError, match="sparse gradients"):
        q = nn.Parameter(torch.zeros(4, 4))
        opt = SCALE([q])
        q.grad = torch.zeros(4, 4).to_sparse()
        opt.step()


def test_no_last_layer_warns(caplog):
    p = nn.Parameter(torch.zeros(3, 3))
    with caplog.at_level("WARNING", logger="fullrank.optim.methods.scale"):
        opt = SCALE([p])
        assert not caplog.text  # nothing at construction (``--help-optim`` probes unnamed parameters)
        p.grad = torch.ones(3, 3)
        opt.step()
        opt.step()
    assert caplog.text.count("no parameter gets momentum") == 1


def test_state_dict_round_trip_resumes_exactly():
    grads = random_grads(toy(), 6, seed=3)
    a = toy()
    opt_a = SCALE(param_groups(a, rank=2, target_modules=("mlp",)), lr=0.01, weight_decay=0.05, adam_lr=0.02,
                  nonfinite="skip")
    run(opt_a, a, grads[:3])
    a.lm_head.weight.grad = torch.full_like(a.lm_head.weight, float("nan"))
    opt_a.step()  # skipped, counted
    saved = through_checkpoint({"model": a.state_dict(), "optim": opt_a.state_dict()})
    b = toy(seed=7)
    b.load_state_dict(saved["model"])
    opt_b = SCALE(param_groups(b, rank=2, target_modules=("mlp",)), lr=0.5, nonfinite="skip")
    opt_b.load_state_dict(saved["optim"])
    assert opt_b.skipped_steps == 1 and opt_b.param_groups[0]["lr"] == 0.01
    assert opt_b.param_groups[0]["adam_lr_ratio"] == pytest.approx(2.0)
    for value in (v for s in saved["optim"]["state"].values() for v in s.values()):
        assert isinstance(value, (torch.Tensor, int, float))
    run(opt_a, a, grads[3:])
    run(opt_b, b, grads[3:])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient(policy):
    model = toy()
    opt = SCALE(param_groups(model, rank=2, target_modules=("mlp",)), lr=0.01, nonfinite=policy)
    grads = random_grads(model, 2)
    run(opt, model, grads[:1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for n, p in model.named_parameters() if p in opt.state}
    for n, p in model.named_parameters():
        p.grad = grads[1][n].clone()
    model.mlp["down"].weight.grad[2, 3] = float("inf")
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="'mlp.down.weight'"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        for k, v in state.get(n, {}).items():
            assert (torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v), (n, k)
    # huge but finite gradients overflow the 2-norm; the exact check lets the step through
    for n, p in model.named_parameters():
        p.grad = torch.full_like(p, 1e300)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_make_optimizer_trains_a_tiny_llama():
    model = tiny_llama()
    opt = make_optimizer("scale", fullrank.param_groups(model, rank=4), lr=3e-3, weight_decay=0.01)
    roles = opt.roles()
    assert roles["lm_head.weight"] == "last_layer" and roles["model.embed_tokens.weight"] == "embedding"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "matrix"
    assert roles["model.norm.weight"] == "vector"
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.3, losses


def test_bf16_parameters_keep_their_dtype():
    model = toy(dtype=torch.bfloat16)
    opt = SCALE(param_groups(model, rank=2, target_modules=("mlp",)), lr=1e-2)
    run(opt, model, random_grads(model, 2))
    assert opt.state[model.lm_head.weight]["exp_avg"].dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in model.parameters())


# ---------------------------------------------------------------------- FSDP2 (2 gloo processes)
def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        plain, sharded = toy(), toy()
        for module in sharded.modules():  # FSDP2's layout: every parameter Shard(0) (11 vocab rows: 6 + 5)
            for key, p in [(k, v) for k, v in module._parameters.items() if v is not None]:
                module._parameters[key] = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
        grads = random_grads(plain, 4)
        options = dict(lr=0.02, weight_decay=0.1, adam_lr=0.05, momentum=0.8)
        opt_plain = SCALE(param_groups(plain, rank=2, target_modules=("mlp",)), **options)
        opt_sharded = SCALE(param_groups(sharded, rank=2, target_modules=("mlp",)), **options)
        run(opt_plain, plain, grads)
        for g in grads:
            for n, p in sharded.named_parameters():
                p.grad = distribute_tensor(g[n], mesh, [Shard(0)])
            opt_sharded.step()
        for (n, p), q in zip(plain.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-12, atol=1e-12, msg=n)
        assert type(opt_sharded.state[sharded.lm_head.weight]["exp_avg"]).__name__ == "DTensor"
        # a NaN in rank 1's rows only: both processes refuse, naming the same parameter
        for n, p in sharded.named_parameters():
            local = torch.zeros(p.to_local().shape, dtype=p.dtype)
            if n == "embed_tokens.weight" and rank == world - 1:
                local[0, 0] = float("nan")
            p.grad = torch.distributed.tensor.DTensor.from_local(local, mesh, [Shard(0)], shape=p.shape,
                                                                 stride=p.stride())
        try:
            opt_sharded.step()
            raise AssertionError("no error on a non-finite gradient of another process")
        except NonFiniteGradientError as err:
            assert "'embed_tokens.weight'" in str(err)
        replicated = nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Replicate()]))
        try:
            SCALE([{"params": [replicated], "param_names": ["w"]}])
            raise AssertionError("a Replicate DTensor was accepted")
        except ValueError as err:
            assert "parameter 'w' is a DTensor" in str(err) and "Shard(0)" in str(err)
        if rank == 0:
            Path(out).write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_sharded_updates_equal_unsharded():
    from processes import spawn as spawn_processes

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result"
        spawn_processes(_fsdp_worker, args=(2, str(Path(tmp) / "init"), str(out)), nprocs=2)
        assert out.read_text() == "ok"
