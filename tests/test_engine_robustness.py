"""State round-trips, bad inputs, non-finite gradients, param_groups, memory, layer-wise mode."""
import copy
import io
import math
import re

import pytest
import torch
from torch import nn

import fullrank
from fullrank.memory import optimizer_state_bytes, projected_state_bytes


class TinyBlock(nn.Module):
    def __init__(self, d=12, hidden=20):
        super().__init__()
        self.embed = nn.Embedding(30, d)
        self.self_attn = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 30, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.self_attn(h)
        h = h + self.mlp(self.norm(h))
        return self.lm_head(h)


def batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 30, (n, 6), generator=g)
    return ids, torch.randint(0, 30, (n, 6), generator=g)


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        ids, y = batch(s)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def make(model, **options):
    groups = fullrank.param_groups(model, rank=4, update_proj_gap=3)
    return fullrank.Fira(groups, lr=0.01, **options)


def assert_plain(obj, path="state_dict"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r}"
            assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            assert_plain(v, f"{path}[{k}]")
    else:
        assert isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))), f"{path}: {type(obj)}"


@pytest.mark.parametrize("options", [{}, {"svd": "randomized"}, {"on_switch": "reproject"}])
def test_state_dict_round_trip_is_bit_identical(options):
    torch.manual_seed(0)
    model = TinyBlock()
    opt = make(model, **options)
    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert_plain(opt.state_dict())
    train(model, opt, 5, start=5)  # uninterrupted: includes a projection refresh at step 6

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyBlock()
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed, **options)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 5, start=5)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_dict_holds_projection_limiter_step_and_moments():
    model = TinyBlock()
    opt = make(model)
    train(model, opt, 2)
    state = opt.state[model.mlp[0].weight]  # 20×12: std projects the right side
    assert set(state) == {"step", "adam_step", "residual_norm", "exp_avg", "exp_avg_sq", "proj_right"}
    assert state["proj_right"].shape == (4, 12) and state["exp_avg"].shape == (20, 4)
    assert isinstance(state["step"], int) and state["residual_norm"].dim() == 0


def test_loading_a_state_of_another_rank_is_refused():
    model = TinyBlock()
    opt = make(model)
    train(model, opt, 1)
    other = fullrank.Fira(fullrank.param_groups(TinyBlock(), rank=6), lr=0.01)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group.pop("rank", None)
    other_sd = other.state_dict()
    sd["param_groups"] = [dict(g, params=s["params"]) for g, s in zip(other_sd["param_groups"], sd["param_groups"])]
    with pytest.raises(ValueError, match="does not fit|do not match"):
        other.load_state_dict(sd)


W = lambda *shape: nn.Parameter(torch.randn(*shape))  # noqa: E731


@pytest.mark.parametrize(
    "group,options,message",
    [
        ({"rank": 0}, {}, r"rank of parameter 'w' \(6, 4\) must be an integer in \[1, 4\], got 0"),
        ({"rank": 5}, {}, r"rank of parameter 'w' \(6, 4\) must be an integer in \[1, 4\], got 5"),
        ({"rank": 2.5}, {}, r"must be an integer"),
        ({"rank": 2}, {"gamma": 0.99}, r"gamma must be a number in \[1.0, inf\], got 0.99"),
        ({"rank": 2}, {"update_proj_gap": 0}, r"update_proj_gap must be an integer in \[1, inf\], got 0"),
        ({"rank": 2}, {"lr": -1e-3}, r"lr must be a number in \[0.0, inf\], got -0.001"),
        ({"rank": 2}, {"betas": (0.9, 1.0)}, r"betas\[1\] must be a number in \[0.0, 1.0\), got 1.0"),
        ({"rank": 2}, {"betas": (-0.1, 0.99)}, r"betas\[0\] must be a number in \[0.0, 1.0\)"),
        ({"rank": 2}, {"residual": "scaled"}, r"residual must be one of \('discard', 'add'"),
        ({"rank": 2}, {"limiter": "growth"}, r"limiter must be one of \('none', 'norm_growth', 'clip', 'gradient_shrink', 'tensor_scaling'\)"),
        ({"rank": 2}, {"proj_type": "middle"}, r"proj_type must be one of \('std', 'reverse_std'"),
        ({"rank": 2}, {"svd": "qr"}, r"svd must be one of"),
        ({"rank": 2}, {"clip_threshold": 0.0}, r"clip_threshold must be a number in \(0.0, inf\]"),
        ({"rank": 2}, {"nonfinite": "ignore"}, r"nonfinite must be one of \('raise', 'skip'\)"),
        ({"rank": 2, "proj_type": "full"}, {}, r"needs a one-sided projection"),
        ({"rank": 2}, {"weight_decay": -0.1}, r"weight_decay must be a number in \[0.0, inf\]"),
    ],
)
def test_bad_options_raise_value_error_naming_the_range(group, options, message):
    with pytest.raises(ValueError, match=message):
        fullrank.SubspaceAdamW([{"params": [W(6, 4)], "param_names": ["w"], **group}], **options)


def test_projecting_a_non_matrix_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(4,\): only 2-D weights"):
        fullrank.Fira([{"params": [W(4)], "param_names": ["bias"], "rank": 1}])


def test_sparse_gradient_is_refused_with_its_name():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = fullrank.SubspaceAdamW([{"params": [emb.weight], "param_names": ["emb.weight"]}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'emb.weight' has a sparse gradient"):
        opt.step()


def test_param_groups_split_and_errors():
    model = TinyBlock()
    groups = fullrank.param_groups(model, rank=4, target_modules=["self_attn", "mlp"], scale=0.25)
    assert groups[0]["param_names"] == ["self_attn.weight", "mlp.0.weight", "mlp.2.weight"]
    assert groups[0]["rank"] == 4 and groups[0]["scale"] == 0.25
    assert "lm_head.weight" in groups[1]["param_names"] and "mlp.0.bias" in groups[1]["param_names"]
    with_head = fullrank.param_groups(model, rank=4, target_modules=["self_attn", "lm_head"])
    assert "lm_head.weight" in with_head[0]["param_names"]
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] matched no nn.Linear module"):
        fullrank.param_groups(model, rank=4, target_modules=["q_proj"])


@pytest.mark.parametrize("poisoned", ["mlp.2.weight", "lm_head.weight"])
def test_non_finite_gradient_raises_before_any_change(poisoned):
    torch.manual_seed(0)
    model = TinyBlock()
    opt = make(model)
    train(model, opt, 2)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    ids, y = batch(99)
    nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten()).backward()
    dict(model.named_parameters())[poisoned].grad[0, 0] = math.nan
    with pytest.raises(fullrank.NonFiniteGradientError, match=f"parameter '{poisoned}'"):
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    after = opt.state_dict()["state"]
    for pid, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(after[pid][key]), torch.as_tensor(value)), (pid, key)


def test_non_finite_gradient_can_skip_the_step_and_count_it():
    model = TinyBlock()
    opt = make(model, nonfinite="skip")
    train(model, opt, 1)
    before = copy.deepcopy(model.state_dict())
    ids, y = batch(5)
    nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten()).backward()
    model.self_attn.weight.grad[1, 1] = math.inf
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["skipped_steps"] == 1
    train(model, opt, 1, start=6)
    assert opt.skipped_steps == 1 and opt.state[model.self_attn.weight]["step"] == 2


def test_huge_finite_gradients_are_not_taken_for_non_finite():
    """‖G‖₂ overflows fp32 for entries near 1e19 (the fast check's sum of squares), yet every entry
    is finite and Adam's v = (1 − β₂)·g² still fits: the step must run, not raise or skip."""
    torch.manual_seed(0)
    model = TinyBlock()
    opt = make(model, nonfinite="skip")
    before = model.self_attn.weight.detach().clone()
    ids, y = batch(3)
    nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten()).backward()
    model.self_attn.weight.grad.mul_(1e20)
    assert not math.isfinite(torch.linalg.vector_norm(model.self_attn.weight.grad).item())
    opt.step()
    assert opt.skipped_steps == 0 and opt.state[model.self_attn.weight]["step"] == 1
    assert torch.isfinite(model.self_attn.weight).all() and not torch.equal(model.self_attn.weight, before)
    assert all(torch.isfinite(v).all() for v in opt.state[model.self_attn.weight].values() if torch.is_tensor(v))


def test_measured_state_matches_the_formula_per_matrix():
    """2·r·(larger side) moments + r·(smaller side) projection + 1 limiter scalar, per m×n matrix."""
    r = 4
    shapes = [(32, 12), (12, 32), (16, 16)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = fullrank.Fira([{"params": params, "rank": r}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, (m, n) in zip(params, shapes):
        elements = sum(v.numel() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
        assert elements == 2 * r * max(m, n) + r * min(m, n) + 1
    expected = sum(2 * r * max(s) + r * min(s) + 1 for s in shapes) * 4
    assert optimizer_state_bytes(opt) == projected_state_bytes(opt) == expected


def test_projected_state_bytes_leave_out_the_plain_group():
    """The plain AdamW group's moments (2 per element) count in the whole state, not in the projected part."""
    r, bias = 4, nn.Parameter(torch.randn(7))
    matrix = nn.Parameter(torch.randn(32, 12))
    opt = fullrank.Fira([{"params": [matrix], "rank": r}, {"params": [bias]}])
    matrix.grad, bias.grad = torch.randn_like(matrix), torch.randn_like(bias)
    opt.step()
    projected = (2 * r * 32 + r * 12 + 1) * 4
    assert projected_state_bytes(opt) == projected
    assert optimizer_state_bytes(opt) == projected + 2 * 7 * 4
    assert optimizer_state_bytes(opt, [bias]) == 2 * 7 * 4


def test_galore_state_is_smaller_than_adamw():
    model = TinyBlock()
    adamw = torch.optim.AdamW(model.parameters())
    fira = make(model)
    train(model, adamw, 1)
    train(model, fira, 1)
    assert optimizer_state_bytes(fira) < optimizer_state_bytes(adamw)


def loss_of(model, step, accumulation=1, micro=0):
    ids, y = batch(10 * step + micro)
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten()) / accumulation


@pytest.mark.parametrize("accumulation", [1, 2])
def test_layerwise_updates_equal_the_ordinary_loop(accumulation):
    """The layer-wise optimizer (a real torch Optimizer, stepped from backward hooks) under an LR
    schedule gives the ordinary loop's weights; its state_dict resumes into a fresh model exactly."""
    torch.manual_seed(0)
    reference = TinyBlock()
    model = copy.deepcopy(reference)
    make_opt = lambda groups: fullrank.Fira(groups, lr=0.01)  # noqa: E731
    schedule = lambda s: 1.0 / (1.0 + s)  # noqa: E731
    ordinary = make_opt(fullrank.param_groups(reference, rank=4, update_proj_gap=3))
    handle = fullrank.layerwise(model, make_opt, fullrank.param_groups(model, rank=4, update_proj_gap=3),
                                accumulation_steps=accumulation)
    assert isinstance(handle, torch.optim.Optimizer)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (ordinary, handle)]
    for step in range(5):
        for micro in range(accumulation):
            for m in (reference, model):
                loss_of(m, step, accumulation, micro).backward()
        ordinary.step()
        ordinary.zero_grad()
        handle.step()
        for scheduler in schedulers:
            scheduler.step()
        assert all(p.grad is None for p in model.parameters())
    assert handle.param_groups[0]["lr"] == ordinary.param_groups[0]["lr"] == 0.01 * schedule(5)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert optimizer_state_bytes(handle) == optimizer_state_bytes(ordinary)
    assert 0 < projected_state_bytes(handle) == projected_state_bytes(ordinary) < optimizer_state_bytes(ordinary)

    twin = TinyBlock()  # (a deepcopy would copy the hooks too)
    twin.load_state_dict(model.state_dict())
    restored = fullrank.layerwise(twin, make_opt, fullrank.param_groups(twin, rank=4, update_proj_gap=3),
                                  accumulation_steps=accumulation)
    restored.load_state_dict(copy.deepcopy(handle.state_dict()))  # as if saved and loaded
    for step in range(5, 8):  # a refresh at step 6
        for micro in range(accumulation):
            for m in (model, twin):
                loss_of(m, step, accumulation, micro).backward()
        handle.step()
        restored.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="layer-wise state holds"):
        fullrank.layerwise(nn.Linear(2, 2), make_opt).load_state_dict(handle.state_dict())


@pytest.mark.parametrize("name", ["mlp.0.weight", "lm_head.weight"])  # projected; plain (torch's fused kernel)
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_layerwise_masks_a_non_finite_gradient_on_the_device(policy, name):
    """A NaN gradient in one parameter during backward: that parameter and its state stay as they
    were (its counters too, so the next steps equal a run without that step for it), the others
    are updated, and step() — the one synchronisation — raises or counts the skip."""
    torch.manual_seed(0)
    model = TinyBlock()
    handle = fullrank.layerwise(model, lambda g: fullrank.Fira(g, lr=0.01, nonfinite=policy),
                                fullrank.param_groups(model, rank=4, update_proj_gap=3,
                                                      target_modules=("self_attn", "mlp")))
    for step in range(2):
        loss_of(model, step).backward()
        handle.step()
    weight = model.get_parameter(name)
    before = weight.detach().clone()
    state_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in handle.state[weight].items()}
    others_before = model.self_attn.weight.detach().clone()
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss_of(model, 2).backward()
    if policy == "raise":
        with pytest.raises(fullrank.NonFiniteGradientError, match=re.escape(name)):
            handle.step()
    else:
        handle.step()
        assert handle.optimizer.skipped_steps == 1
    assert torch.equal(weight, before)
    for key, value in state_before.items():
        after = handle.state[weight][key]
        assert (torch.equal(after, value) if torch.is_tensor(value) else after == value), key
    assert not torch.equal(model.self_attn.weight, others_before)


def test_layerwise_refuses_a_non_fullrank_optimizer():
    model = TinyBlock()
    with pytest.raises(TypeError, match="layerwise needs a fullrank SubspaceAdamW"):
        fullrank.layerwise(model, lambda g: torch.optim.AdamW(g))


def test_layerwise_refuses_bad_accumulation():
    with pytest.raises(ValueError, match=r"accumulation_steps must be an integer in \[1, inf\], got 0"):
        fullrank.layerwise(TinyBlock(), lambda g: fullrank.Fira(g), accumulation_steps=0)
