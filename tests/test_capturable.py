"""capturable=True and the compiled step: a steady step reads nothing on the host, a
non-finite gradient is masked on the device, and the result is the default step's — over steps with
refreshes, a non-finite gradient on a steady step and one on a refresh step, eager and compiled."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fullrank
from fullrank.optim.base import host

SHAPES = [(24, 16), (24, 16), (16, 24)]
GAP = 3  # T: refreshes at the step counts 0, 3, 6, 9
# t → the value put into one gradient entry. t = 4 is a steady step (masked on the device); t = 7
# comes when the default step refreshes (a synchronised step that skips: the refresh moves to t = 8).
BAD = {4: float("nan"), 7: float("inf")}


def build(preset, capturable: bool, **options):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    params.append(torch.nn.Parameter(torch.randn(30, generator=g)))  # a plain group
    groups = [{"params": params[:3], "rank": 4, "update_proj_gap": GAP}, {"params": params[3:]}]
    opt = preset(groups, lr=1e-2, weight_decay=0.1, nonfinite="skip", capturable=capturable, **options)
    return params, opt


def set_gradients(params, t: int, bad: dict = BAD) -> None:
    g = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if t in bad:
        params[1].grad[0, 0] = bad[t]


def train(preset, capturable: bool, steps: int = 11, **options):
    params, opt = build(preset, capturable, **options)
    for t in range(steps):
        set_gradients(params, t)
        opt.step()
    return params, opt


def as_number(value):
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def assert_same_run(a, b, rtol=1e-5, atol=1e-6):
    (params_a, opt_a), (params_b, opt_b) = a, b
    for x, y in zip(params_a, params_b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for x, y in zip(params_a, params_b):
        state_a, state_b = opt_a.state[x], opt_b.state[y]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            if isinstance(state_a[key], torch.Tensor) and state_a[key].dim() > 0:
                torch.testing.assert_close(state_a[key], state_b[key], rtol=rtol, atol=atol)
            else:
                assert as_number(state_a[key]) == pytest.approx(as_number(state_b[key]), rel=rtol, abs=atol), key
    assert opt_a.skipped_steps == opt_b.skipped_steps == len(BAD)


@pytest.mark.parametrize("preset, options", [
    (fullrank.Fira, {}), (fullrank.GaLore, {}), (fullrank.APOLLO, {}), (fullrank.APOLLO_Mini, {}), (fullrank.FRUGAL, {}),
    (fullrank.AdaRankGrad, dict(refresh_threshold=0.0)),  # (its convergence trigger reads the host: refused)
], ids=["fira", "galore", "apollo", "apollo_mini", "frugal", "adarankgrad_fixed_gap"])
def test_capturable_steps_as_the_default_step(preset, options):
    """Over 11 steps with refreshes (T = 3) and two non-finite gradients, the capturable step gives
    the default step's weights, state and skip count (fp32 rounding: its bias corrections are
    computed on the device); its counters are device tensors."""
    default, capturable = train(preset, False, **options), train(preset, True, **options)
    assert_same_run(default, capturable)
    params, opt = capturable
    assert all(isinstance(opt.state[p]["step"], torch.Tensor) for p in params)
    assert opt.state[params[0]]["step"].item() == 11 - len(BAD)


class CountHostReads(TorchDispatchMode):
    """Counts reads of device values on the host: ``item``/``bool``/``float`` (``_local_scalar_dense``)
    here, ``tolist`` and the engine's ``host.read`` by the patches of the test."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_a_steady_step_reads_nothing_on_the_host(monkeypatch):
    """Steps where no refresh can be due read nothing, a non-finite one included; the first step and
    the refresh steps read (so the counter sees the reads there are)."""
    counter = CountHostReads()
    real_read, real_tolist = host.read, torch.Tensor.tolist

    def counted_read(values, assumed):
        counter.reads += 1
        return real_read(values, assumed)

    def counted_tolist(tensor):
        counter.reads += 1
        return real_tolist(tensor)

    monkeypatch.setattr(host, "read", counted_read)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    params, opt = build(fullrank.Fira, True)
    reads = []
    for t in range(8):
        set_gradients(params, t, {4: float("nan")})
        counter.reads = 0
        with counter:
            opt.step()
        reads.append(counter.reads)
    # refreshes at t = 0, 3 and 7 (the masked t = 4 does not count: the refresh due at count 6 moves
    # to t = 7); t = 6 may hold it (the host knows the count only within bounds) and reads to see
    steady = [t for t, n in enumerate(reads) if n == 0]
    assert steady == [1, 2, 4, 5], reads
    assert opt.skipped_steps == 1


def test_engine_compiled_capturable_step_agrees_with_eager():
    """compile=True with capturable=True: each bucket's whole step (projection, Adam, rule, limiter,
    masked write) compiled with fullgraph=True by inductor gives the eager capturable run."""
    torch._dynamo.reset()
    eager = train(fullrank.Fira, True, steps=6)
    compiled = train(fullrank.Fira, True, steps=6, compile=True)
    for x, y in zip(eager[0], compiled[0]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert compiled[1].skipped_steps == eager[1].skipped_steps == 1


@pytest.mark.parametrize("preset", [fullrank.Fira, fullrank.GaLore], ids=["fira", "galore"])
def test_user_compiled_steady_step_has_no_graph_break(preset):
    """``torch.compile(opt.step, fullgraph=True)`` compiles the steady steps (a non-finite one
    included) without a graph break, and gives the eager steps' weights. The refresh steps run
    eagerly here (they read the host)."""
    torch._dynamo.reset()

    def run(compiled: bool):
        params, opt = build(preset, True)
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for t in range(GAP + 1):  # t = 0 refreshes; 1, 2 are steady (t = 2: NaN); 3 refreshes
            set_gradients(params, t, {2: float("nan")})
            (step if t in (1, 2) else opt.step)()
        return params, opt

    eager, compiled = run(False), run(True)
    for x, y in zip(eager[0], compiled[0]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert compiled[1].skipped_steps == 1


@pytest.mark.parametrize("options, message", [
    (dict(nonfinite="raise"), "nonfinite='raise'"),
    (dict(stochastic_rounding=True), "stochastic_rounding=True"),
    (dict(states="8bit"), "states='8bit'"),
    (dict(refresh_threshold=0.5), "refresh_threshold > 0"),
    (dict(pre_projection="error_feedback"), "pre_projection='error_feedback'"),
    (dict(adam_convention="transformers"), "adam_convention='transformers' in a plain group"),
])
def test_capturable_refuses_what_needs_the_host(options, message):
    params = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))]
    groups = [{"params": params[:1], "rank": 2}, {"params": params[1:]}]
    base = dict(nonfinite="skip", capturable=True)
    with pytest.raises(ValueError, match=re.escape(f"capturable=True does not support {message}")):
        fullrank.SubspaceAdamW(groups, **{**base, **options})


def test_capturable_is_one_setting_for_every_group_and_not_layerwise():
    params = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))]
    opt = fullrank.Fira([{"params": params[:1], "rank": 2}], nonfinite="skip", capturable=True)
    with pytest.raises(ValueError, match="capturable must be the same in every param group"):
        opt.add_param_group({"params": params[1:], "capturable": False})
    assert len(opt.param_groups) == 1
    model = torch.nn.Linear(6, 8)
    with pytest.raises(ValueError, match="layerwise: capturable=True is not supported"):
        fullrank.LayerwiseOptimizer(model, fullrank.SubspaceAdamW(model.parameters(), nonfinite="skip",
                                                                   capturable=True))


def test_checkpoints_cross_between_capturable_and_default():
    """A capturable run's state loads into a default optimizer (its device counters read as ints) and
    a default run's into a capturable one; both continue as the run that was not interrupted. A deep
    copy of a capturable optimizer steps as the original."""
    reference = train(fullrank.Fira, False, steps=11)
    for first, second in ((True, False), (False, True)):
        params, opt = train(fullrank.Fira, first, steps=5)
        saved = copy.deepcopy(opt.state_dict())
        resumed = build(fullrank.Fira, second)
        for p, q in zip(resumed[0], params):
            p.data.copy_(q.data)
        resumed[1].load_state_dict(saved)
        counter = resumed[1].state[resumed[0][0]]["step"]
        assert isinstance(counter, torch.Tensor) == second and as_number(counter) == 5 - 1  # t = 4 masked
        for t in range(5, 11):
            set_gradients(resumed[0], t)
            resumed[1].step()
        assert_same_run(reference, resumed)
    params, opt = train(fullrank.Fira, True, steps=5)
    twin = copy.deepcopy(opt)
    twin_params = [group["params"] for group in twin.param_groups]
    twin_params = twin_params[0] + twin_params[1]
    for t in range(5, 8):
        set_gradients(params, t)
        set_gradients(twin_params, t)
        opt.step()
        twin.step()
    for x, y in zip(params, twin_params):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # (the copy's next step synchronises)


def test_compiled_buckets_beyond_dynamos_default_limit(monkeypatch):
    """compile=True with more bucket signatures than Dynamo's default recompile limit (8 graphs per
    code object: every bucket shares ``bucket_update_``): each gets its graph, and the run equals the
    eager one. (Dynamo's eager backend: the graphs are counted the same, without inductor's time.)"""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    shapes = [(12 + k, 10) for k in range(10)]

    def run(compile: bool):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = fullrank.Fira([{"params": params, "rank": 3, "update_proj_gap": 4}], lr=1e-2, nonfinite="skip",
                            capturable=True, compile=compile)
        for t in range(3):
            set_gradients(params, t, {})
            opt.step()
        return params

    for x, y in zip(run(False), run(True)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
