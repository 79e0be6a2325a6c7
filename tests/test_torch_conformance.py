"""torch.optim conventions (modelled on torch's test/test_optim.py) for the layer-wise wrapper,
``fullrank.param_groups``, the Trainer's learning rate and the command line's output.

The engine's own conformance (deepcopy of Fira/GaLore/APOLLO, atomic load_state_dict, tensor lr,
maximize) is in ``test_engine_conformance.py``.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fullrank

SRC = Path(__file__).resolve().parents[1] / "src"


def _model(seed=0, frozen_last=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    if frozen_last:
        model[4].weight.requires_grad_(False)
    return model


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return (model(x) - y).square().mean()


def _plain_layerwise(model):
    return fullrank.layerwise(model, lambda g: fullrank.SubspaceAdamW(g, lr=1e-2, weight_decay=0.1))


def _train(model, opt, steps, first=0):
    for k in range(first, first + steps):
        _loss(model, k).backward()
        opt.step()
        opt.zero_grad()


def _public(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- #1: deepcopy and pickle of the wrapper
def test_layerwise_deepcopy_copies_all_public_attrs_and_trains_the_copied_model():
    """torch's test_deepcopy_copies_all_public_attrs, and the copy steps its own (copied) parameters."""
    model = _model()
    opt = _plain_layerwise(model)
    _train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert _public(opt) == _public(opt2)
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in model2.parameters()}
    _train(model, opt, 2, first=3)
    _train(model2, opt2, 2, first=3)
    assert _same_weights(model, model2)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters()))


def test_layerwise_pickle_round_trip_trains_like_the_original():
    model = _model()
    opt = _plain_layerwise(model)
    _train(model, opt, 2)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert _public(opt) == _public(opt2) and opt2.accumulation_steps == opt.accumulation_steps
    _train(model, opt, 2, first=2)
    _train(model2, opt2, 2, first=2)
    assert _same_weights(model, model2)


def test_layerwise_copy_leaves_the_original_hooks_alone_and_keeps_remove():
    model = _model()
    opt = _plain_layerwise(model)
    _train(model, opt, 1)
    copy.deepcopy((model, opt))  # the copy's hooks are on the copied parameters only
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, first=1)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.remove()
    model3, _ = copy.deepcopy((model, opt))
    _loss(model3, 5).backward()  # no hooks: gradients stay, nothing is updated
    assert all(p.grad is not None for p in model3.parameters())


# ---------------------------------------------------------------- #3: add_param_group and hooks
def test_layerwise_add_param_group_trains_an_unfrozen_layer_like_the_ordinary_step():
    runs = []
    for layerwise in (False, True):
        model = _model(frozen_last=True)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        inner = fullrank.SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1)
        opt = fullrank.optim.LayerwiseOptimizer(model, inner) if layerwise else inner
        _train(model, opt, 2)
        opt.zero_grad()
        model[4].weight.requires_grad_(True)
        opt.add_param_group({"params": [model[4].weight], "lr": 5e-2})
        _train(model, opt, 3, first=2)
        runs.append(model)
    frozen = _model(frozen_last=True)[4].weight
    assert not torch.equal(runs[1][4].weight, frozen)
    assert _same_weights(runs[0], runs[1])


def test_layerwise_add_param_group_validates_before_changing_anything():
    model = _model(frozen_last=True)
    opt = fullrank.optim.LayerwiseOptimizer(
        model, fullrank.SubspaceAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    n_groups, n_hooks = len(opt.param_groups), len(opt._handles)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    with pytest.raises(ValueError, match=r"'param 5'.*requires_grad=True"):
        opt.add_param_group({"params": [model[4].weight]})
    model[4].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [model[4].weight], "rank": 0})
    assert len(opt.param_groups) == n_groups == len(opt.optimizer.param_groups) and len(opt._handles) == n_hooks
    _train(model, opt, 1)  # still consistent: steps
    assert model[4].weight.grad is not None  # (not in a group: its gradient is left alone)


def test_layerwise_group_added_through_the_inner_optimizer_is_refused_at_step():
    model = _model(frozen_last=True)
    opt = fullrank.optim.LayerwiseOptimizer(
        model, fullrank.SubspaceAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    model[4].weight.requires_grad_(True)
    opt.optimizer.add_param_group({"params": [model[4].weight]})
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="LayerwiseOptimizer.add_param_group"):
        opt.step()


def test_layerwise_state_dict_hooks_fire():
    model = _model()
    opt = _plain_layerwise(model)
    _train(model, opt, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "post"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", sd.get("note"))) or {
        k: v for k, v in sd.items() if k != "note"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o is opt)))
    saved = opt.state_dict()
    assert saved["note"] == "post"
    opt.load_state_dict(saved)
    assert calls == [("pre", True), ("load_pre", "post"), ("load_post", True)]
    _train(model, opt, 1, first=1)


def test_layerwise_step_hooks():
    model = _model()
    opt = _plain_layerwise(model)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(
        all(p.grad is None for p in model.parameters())))
    with pytest.warns(UserWarning, match="after every parameter was updated in backward"):
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    _train(model, opt, 2)
    assert seen == ["pre", True, "pre", True]


# ---------------------------------------------------------------- #5: param_names
def test_param_groups_without_names_let_torch_add_unnamed_groups():
    model = _model(frozen_last=True)
    named = fullrank.param_groups(model, rank=2, target_modules=["0", "2"])
    assert all("param_names" in g for g in named)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6):  # torch's rule since param_names exist
        with pytest.raises(ValueError, match="names"):
            torch.optim.AdamW([{"params": g["params"], "param_names": g["param_names"]} for g in named]).add_param_group(
                {"params": [model[4].weight.requires_grad_(True)]})
        model[4].weight.requires_grad_(False)
    plain = fullrank.param_groups(model, rank=2, target_modules=["0", "2"], names=False)
    assert not any("param_names" in g for g in plain)
    opt = torch.optim.AdamW([{"params": g["params"]} for g in plain])
    opt.add_param_group({"params": [model[4].weight.requires_grad_(True)]})
    assert len(opt.param_groups) == 3


def test_layerwise_add_param_group_without_names_after_param_groups():
    model = _model(frozen_last=True)
    groups = fullrank.param_groups(model, rank=2, target_modules=["0", "2"])
    opt = fullrank.layerwise(model, lambda g: fullrank.SubspaceAdamW(g, lr=1e-2), groups)
    model[4].weight.requires_grad_(True)
    opt.add_param_group({"params": [model[4].weight]})
    assert opt.param_groups[-1]["param_names"] == [f"param {len(groups[0]['params']) + len(groups[1]['params'])}"]
    before = model[4].weight.detach().clone()
    _train(model, opt, 1)
    assert not torch.equal(model[4].weight, before)


# ---------------------------------------------------------------- layer-wise inside torch.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_with_layerwise_trains_as_eager(backend):
    """forward, backward (the hooks step each parameter) and ``opt.step()`` compiled as one function:
    the hooks run eagerly, so the optimizer's arithmetic is eager's (aot_eager: bit for bit; inductor
    fuses the loss, so to float rounding)."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = _model()
        groups = fullrank.param_groups(model, rank=2, target_modules=["0", "2", "4"], update_proj_gap=2)
        opt = fullrank.layerwise(model, lambda g: fullrank.Fira(g, lr=1e-2), groups)

        def train_step(k):
            loss = _loss(model, k)
            loss.backward()
            opt.step()
            return loss.detach()

        step = torch.compile(train_step, backend=backend) if compiled else train_step
        losses = torch.stack([step(k) for k in range(5)])  # refreshes at steps 1, 3, 5
        runs.append((losses, [p.detach().clone() for p in model.parameters()], opt))
    (eager_losses, eager_weights, eager_opt), (losses, weights, opt) = runs
    exact = backend == "aot_eager"
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, eager_losses, **tolerance)
    for got, want in zip(weights, eager_weights):
        torch.testing.assert_close(got, want, **tolerance)
    assert opt.optimizer.state_dict()["state"].keys() == eager_opt.optimizer.state_dict()["state"].keys()
    assert not torch.equal(weights[0], _model().state_dict()["0.weight"])  # it trained


def test_layerwise_hook_without_a_gradient_does_nothing():
    model = _model()
    opt = _plain_layerwise(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt._hook(model[0].weight)  # (as a backward that produced no gradient for it would)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.optimizer.state.get(model[0].weight, {}) == {}


# ---------------------------------------------------------------- #7: the command line's output
FINETUNE_LINES = (  # every line ``fullrank finetune --no-progress`` prints (stdout), and nothing on stderr
    r"CPU threads: 1 \(--threads; --threads N sets it\)",
    r"model \S+: [\d.]+M parameters, [\d.]+M trainable; method fira \(rank 4\), 16 training examples, run dir \S+",
    r"task +\| +n \| +generate \| likelihood", r"-+", r"keys +\| +4 \| +[\d.]+% \| +[\d.]+%",
    r"average +\| +\| +[\d.]+% \| +[\d.]+%", r"method fira \(rank 4\): 1 steps, final train loss [\d.]+",
    r"optimizer state [\d.]+ MiB, peak memory [\d.]+ [KMG]iB \(\w+\), [\d,]+ tokens/s", r"run dir \S+",
)


def test_finetune_command_prints_only_its_own_lines(tmp_path):
    """``fullrank finetune`` imports transformers.Trainer, which imports peft and bitsandbytes (whose
    CPU backend logs through ``kernels``), and saves with transformers: whatever a third party says
    at any of these points is noise, whatever its text."""
    import re

    from finetune_fixtures import tiny_model_dir, write_task

    model, data = tiny_model_dir(tmp_path / "model"), write_task(tmp_path / "data", "keys", n_train=16, n_test=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["finetune", "--model", str(model), "--data-dir", str(data), "--train", "keys", "--eval", "keys",
            "--out-dir", str(tmp_path / "run"), "--no-progress", "--max-steps", "1", "--batch-size", "4",
            "--micro-batch-size", "4", "--rank", "4", "--save-every", "0", "--threads", "1"]
    run = subprocess.run([sys.executable, "-m", "fullrank", *argv], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    strange = [line for line in lines if not any(re.fullmatch(pattern, line.strip()) for pattern in FINETUNE_LINES)]
    assert not strange and len(lines) == len(FINETUNE_LINES), run.stdout


TRAINER_SCRIPT = """
import sys
import torch
from fullrank.hf import optimizer_cls_and_kwargs  # first, as in README (it quiets what the Trainer's import logs)
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=16))
data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(4)]
args = TrainingArguments(output_dir=sys.argv[1] + "/out", max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-3, report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True)
opt = optimizer_cls_and_kwargs(model, method="fira", rank=2, target_modules="all-linear")
Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=opt).train()
print("trained")
"""


def test_readme_trainer_snippet_prints_no_third_party_warning(tmp_path):
    """README's ``fullrank.hf`` snippet in a user's script (the Trainer's own progress bar off)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", TRAINER_SCRIPT, str(tmp_path)],
                         check=False, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert run.stdout.splitlines()[-1] == "trained"


EIGHT_BIT_SCRIPT = """
import torch
import fullrank
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(64, 96))
opt = fullrank.Fira([{"params": [w], "rank": 8}], lr=1e-2, states="8bit")
w.grad = torch.randn(64, 96)
opt.step()
print("stepped")
"""


def test_8bit_states_in_a_user_script_print_nothing_on_stderr():
    """``states="8bit"`` imports bitsandbytes, whose CPU backend logs about its optional kernels on
    import: a script that asks for 8-bit states sees only its own output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", EIGHT_BIT_SCRIPT], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert run.stdout.splitlines() == ["stepped"]


def test_quiet_third_party_raises_unset_loggers_to_error_and_keeps_chosen_levels():
    import logging

    from fullrank._quiet import QUIET_LOGGERS, quiet_third_party

    chosen = logging.getLogger(QUIET_LOGGERS[0])
    before = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        chosen.setLevel(logging.INFO)  # the user's choice stays
        quiet_third_party()
        quiet_third_party()
        assert chosen.level == logging.INFO
        for name in QUIET_LOGGERS[1:]:
            logger = logging.getLogger(name)
            assert logger.level == logging.ERROR
            child = logging.getLogger(f"{name}._internals.hf_hub")  # what logs "Skipping publisher trust check"
            assert not child.isEnabledFor(logging.WARNING) and child.isEnabledFor(logging.ERROR)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
