"""torch.optim conventions of the engine (``SubspaceAdamW`` and its presets), modelled on torch's
test/test_optim.py: deepcopy and pickle, an atomic ``load_state_dict`` and the rank it loads, a
tensor ``lr``, ``maximize`` and ``add_param_group`` after ``fullrank.param_groups``.
"""
from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import fullrank

PRESETS = {"fira": fullrank.Fira, "galore": fullrank.GaLore, "apollo": fullrank.APOLLO}


def _model(seed=0, hidden=8, frozen_last=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    if frozen_last:
        model[4].weight.requires_grad_(False)
    return model


def _groups(model, rank=2, **options):
    return fullrank.param_groups(model, rank=rank, target_modules=["0", "2"], update_proj_gap=2, **options)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return (model(x) - y).square().mean()


def _train(model, opt, steps, first=0, sign=1.0):
    for k in range(first, first + steps):
        (sign * _loss(model, k)).backward()
        opt.step()
        opt.zero_grad()


def _public(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _snapshot(opt):
    """Groups and state of ``opt`` (values), to check that a refused load changed nothing."""
    groups = [{k: (list(map(id, v)) if k == "params" else v) for k, v in g.items()} for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return groups, state


def _assert_unchanged(opt, snapshot):
    groups, state = _snapshot(opt)
    assert groups == snapshot[0]
    assert state.keys() == snapshot[1].keys()
    for key, values in state.items():
        assert values.keys() == snapshot[1][key].keys()
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, snapshot[1][key][name]), name
            else:
                assert value == snapshot[1][key][name], name


# ---------------------------------------------------------------- #1: deepcopy and pickle
@pytest.mark.parametrize("method", sorted(PRESETS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_keeps_public_attrs_and_steps_like_the_original(method, how):
    """torch's test_deepcopy_copies_all_public_attrs; then the copy trains its copied model exactly
    as the original trains its own (refreshes included: update_proj_gap=2)."""
    model = _model()
    opt = PRESETS[method](_groups(model), lr=1e-2)
    opt.record_residual_stats = method == "fira"
    _train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert _public(opt) == _public(opt2)
    assert opt2.record_residual_stats == opt.record_residual_stats and opt2.skipped_steps == opt.skipped_steps
    _train(model, opt, 3, first=3)
    _train(model2, opt2, 3, first=3)
    assert _same_weights(model, model2)


def test_layerwise_copy_of_a_projected_optimizer_trains_the_copied_model():
    model = _model()
    opt = fullrank.layerwise(model, lambda g: fullrank.Fira(g, lr=1e-2), _groups(model))
    _train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    _train(model, opt, 3, first=3)
    _train(model2, opt2, 3, first=3)
    assert _same_weights(model, model2)


# ---------------------------------------------------------------- #2: atomic load_state_dict
def _trained(model, rank=2, steps=3):
    opt = fullrank.Fira(_groups(model, rank), lr=1e-2)
    _train(model, opt, steps)
    return opt


def _refused_load_changes_nothing(opt, model, saved, match, rank=2):
    before = _snapshot(opt)
    reference_model = copy.deepcopy(model)  # the same optimizer, never offered the bad state
    reference = fullrank.Fira(_groups(reference_model, rank), lr=1e-2)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch shares tensors of equal dtype)
    saved_copy = copy.deepcopy(saved)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)
    assert repr(saved) == repr(saved_copy), "load_state_dict modified the state dict it was given"
    _train(model, opt, 2, first=10)
    _train(reference_model, reference, 2, first=10)
    assert _same_weights(model, reference_model)


def test_load_state_dict_for_another_model_shape_changes_nothing():
    saved = _trained(_model(hidden=8)).state_dict()
    model = _model(hidden=10)
    opt = _trained(model)
    _refused_load_changes_nothing(opt, model, saved, "0.weight")


def test_load_state_dict_with_another_number_of_groups_changes_nothing():
    saved = _trained(_model()).state_dict()
    saved["param_groups"] = saved["param_groups"][:1]
    for group in saved["param_groups"]:  # as saved by an earlier version, before these options existed
        del group["compile"], group["bucket_cap_mb"]
    model = _model()
    opt = _trained(model)
    _refused_load_changes_nothing(opt, model, saved, "group")


def test_a_rejected_rank_does_not_stay_in_the_group():
    saved = _trained(_model(), rank=2).state_dict()
    saved["param_groups"][0]["rank"] = 3  # the states are rank-2 moments: refused
    model = _model()
    opt = _trained(model, rank=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _refused_load_changes_nothing(opt, model, saved, "rank")
    assert opt.param_groups[0]["rank"] == 2
    assert not [w for w in caught if "training continues" in str(w.message)], "a refused load said it continues"


def test_loading_another_rank_warns_naming_both():
    """A rank-2 state into an optimizer built at rank 3 trains at rank 2: say so."""
    saved = _trained(_model(), rank=2).state_dict()
    opt = fullrank.Fira(_groups(_model(), rank=3), lr=1e-2)
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(saved)
    text = " ".join(str(w.message) for w in record)
    assert "rank" in text and re.search(r"\b2\b", text) and re.search(r"\b3\b", text), text


def test_loading_the_same_rank_is_silent():
    model = _model()
    saved = _trained(model, rank=2).state_dict()
    opt = fullrank.Fira(_groups(model, rank=2), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved)


# ---------------------------------------------------------------- #4: a tensor lr
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_tensor_lr_in_a_group_steps_like_the_float_or_is_refused_clearly(method):
    """torch accepts a 0-d tensor lr; the engine must either match the float lr's step or refuse
    with an error naming ``lr`` before anything is changed (not a TypeError from a foreach kernel)."""
    runs = []
    for as_tensor in (False, True):
        model = _model()
        opt = PRESETS[method](_groups(model), lr=1e-2)
        _train(model, opt, 1)
        if as_tensor:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"])
        before = _weights(model)
        try:
            _train(model, opt, 3, first=1)
        except (ValueError, TypeError) as err:  # refused: clearly, and before the first write
            assert "'lr'" in str(err) and "tensor" in str(err), err
            assert "_foreach" not in str(err), err
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            return
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- #8: maximize
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_maximize_as_torch_or_refused_with_a_message(method):
    """``maximize=False`` (torch's default) is accepted; ``maximize=True`` either ascends (the same
    step as descending on the negated loss) or raises ValueError saying it is not supported."""
    PRESETS[method](_groups(_model()), lr=1e-2, maximize=False)
    try:
        ascent = PRESETS[method](_groups(model := _model()), lr=1e-2, maximize=True)
    except ValueError as err:
        assert "maximize" in str(err) and "not supported" in str(err), err
        return
    assert all(g["maximize"] for g in ascent.param_groups)
    _train(model, ascent, 3)
    reference = _model()
    _train(reference, PRESETS[method](_groups(reference), lr=1e-2), 3, sign=-1.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- #5: add_param_group after param_groups
def test_add_param_group_without_names_after_param_groups():
    """fullrank.param_groups names its parameters; a later group without names (an unfrozen layer)
    must be added (named ``param <k>``) and trained, not refused by torch's with/without-names rule."""
    model = _model(frozen_last=True)
    opt = fullrank.Fira(_groups(model), lr=1e-2)
    _train(model, opt, 1)
    model[4].weight.requires_grad_(True)
    opt.add_param_group({"params": [model[4].weight]})
    assert opt.param_groups[-1]["param_names"] == [f"param {sum(len(g['params']) for g in opt.param_groups[:-1])}"]
    before = model[4].weight.detach().clone()
    _train(model, opt, 1, first=1)
    assert not torch.equal(model[4].weight, before)
