"""``trace``: the peak memory of real training steps, traced on fake tensors without allocating.

The model is built under torch's ``FakeTensorMode`` (shapes and dtypes, no storage) and goes through
``fullrank pretrain``'s own code: ``prepare_model`` (``--weights``, ``--activation-checkpointing``),
``make_optimizer`` (the param groups, the method, ``--states``, the layer-wise hooks) and two full
iterations of forward, backward, ``step`` (a subspace refresh in each: ``update_proj_gap=1``) and
``zero_grad``. torch's ``MemTracker`` follows every storage and records the peak per category.

Categories: weights (parameters and buffers), gradients, optimizer_state (the tensors in the
optimizer's ``state`` once a step has made them), activations (made in forward, and recomputed in
backward under activation checkpointing), temporaries (everything else: backward's intermediate
tensors, the step's work tensors, the layer-wise steps' state made during backward).

``fp32`` weights run the forward under ``torch.autocast(<device>, bfloat16)``: on a CPU trace the
casts are CPU autocast's (the same op list as CUDA's for matmuls; bf16 copies of the weights are
saved for backward in both). The attention kernel is the device's ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries")
ITERATIONS = 2


@dataclasses.dataclass
class MemoryTrace:
    """One traced run: the settings, the peak (bytes) and its split into ``CATEGORIES``."""

    settings: dict
    peak_bytes: int
    by_category: dict
    peak_phase: str  # forward, backward, optimizer step or zero_grad, of iteration 1 or 2
    resident_bytes: dict  # after the last iteration: weights and optimizer_state
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tracker_class():
    """``MemTracker`` with the optimizer step's allocations counted as temporaries until the step
    ends and finds them in ``optimizer.state`` (torch counts every step allocation as state)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class StepMemTracker(MemTracker):
        phase = "setup"
        peak_phase = "setup"

        def _track(self, reftype, t):
            super()._track(_MemRefType.TEMP if reftype == _MemRefType.OPT else reftype, t)

        def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
            if t is None:  # a layer-wise hook freed the gradient before the tracker's own hook ran
                return set()
            return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

        def _update_peak_stats(self, peak_state):
            # the global peak only: torch's also updates every module's peak (not reported here), at
            # a cost that grows with the number of modules and took most of a 7B trace's time
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                    self.peak_phase = self.phase

    return StepMemTracker, _MemRefType


def _categories(snapshot: dict, ref) -> dict:
    """A MemTracker device snapshot as bytes per category of ``CATEGORIES``."""
    get = lambda *keys: sum(int(snapshot.get(k, 0)) for k in keys)  # noqa: E731
    return {
        "weights": get(ref.PARAM, ref.BUFFER),
        "gradients": get(ref.GRAD),
        "optimizer_state": get(ref.OPT),
        "activations": get(ref.ACT),
        "temporaries": get(ref.TEMP, ref.OTH),
    }


def resolve_model(model: str) -> str:
    """A preset name, a config.json, or a Hugging Face model folder (its config.json)."""
    path = Path(model)
    if path.is_dir():
        from ..train.errors import ConfigError

        if not (path / "config.json").is_file():
            raise ConfigError(f"--model: folder '{model}' holds no config.json")
        return str(path / "config.json")
    return model


def trace_config(model="llama_7b", method="fira", *, rank=None, batch_size=1, seq_len=256, weights="fp32",
                 states="32bit", layerwise=False, activation_checkpointing=False,
                 target_modules=("self_attn", "mlp"), optim_args=None):
    """The ``TrainConfig`` of a traced step (checked as ``fullrank pretrain`` checks its flags)."""
    from ..train import config as C
    from ..train.errors import ConfigError

    if method not in C.engine_methods():
        raise ConfigError(f"--method: unknown method '{method}' for memory; allowed: {', '.join(C.engine_methods())}")
    values = dict(model=resolve_model(str(model)), method=method, rank=rank, batch_size=batch_size, grad_accum=1,
                  seq_len=seq_len, weights=weights, states=states, layerwise=bool(layerwise),
                  activation_checkpointing=bool(activation_checkpointing), target_modules=list(target_modules),
                  update_proj_gap=1, optim_args=dict(optim_args or {}), recipe="cpu", device="cpu", out_dir=".")
    values = {k: v for k, v in values.items() if v is not None}
    cfg = C.build({k: C.coerce(k, v, "--" + k.replace("_", "-")) for k, v in values.items()})
    return C.finalize(cfg)


def trace(model="llama_7b", method="fira", *, rank=None, batch_size=1, seq_len=256, weights="fp32", states="32bit",
          layerwise=False, activation_checkpointing=False, target_modules=("self_attn", "mlp"), optim_args=None,
          device="cpu") -> MemoryTrace:
    """Trace two training iterations of ``model`` with ``method`` on fake tensors; see the module doc.

    ``model``: llama_tiny … llama_7b, a LlamaConfig .json or a Hugging Face model folder; ``method``:
    any ``fullrank.make_optimizer`` name; ``weights``: fp32 (bf16 autocast), bf16 or bf16-sr;
    ``states``: 32bit or 8bit; ``device``: the fake tensors' device (cpu, or cuda where there is one).
    Raises ``fullrank.train.errors.ConfigError`` (one line) on a bad setting.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        from ..train.errors import ConfigError

        raise ConfigError(f"--device: '{device}' is not available here; allowed: cpu"
                          + (", cuda" if torch.cuda.is_available() else " (no CUDA device)"))
    cfg = trace_config(model, method, rank=rank, batch_size=batch_size, seq_len=seq_len, weights=weights,
                       states=states, layerwise=layerwise, activation_checkpointing=activation_checkpointing,
                       target_modules=target_modules, optim_args=optim_args)
    start = time.perf_counter()
    Tracker, ref = _tracker_class()
    peaks = []
    with FakeTensorMode():
        net, optimizer = build_step(cfg, device)
        tracker = Tracker()
        tracker.track_external(net, optimizer)

        def mark(phase: str) -> None:
            tracker.phase = phase

        def before(iteration: int) -> None:
            if iteration > 1:
                tracker.reset_mod_stats()  # MemTracker's module stats are per iteration
                _restart_peak(tracker)

        def after(iteration: int) -> None:
            snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
            peaks.append((int(snapshot.get("Total", 0)), tracker.peak_phase, snapshot))

        with tracker:
            training_iterations(net, optimizer, cfg, device, mark=mark, before=before, after=after)
            current = next(iter(tracker.get_tracker_snapshot("current").values()), {})
    # the larger iteration peak; on a tie the later one, whose split sees the optimizer state in place
    peak, phase, snapshot = max(reversed(peaks), key=lambda p: p[0])
    resident = _categories(current, ref)
    settings = dict(model=str(model), method=cfg.method, rank=cfg.rank if cfg.method not in ("adamw", "adamw8bit") else None,
                    batch_size=cfg.batch_size, seq_len=cfg.seq_len, weights=cfg.weights, states=cfg.states,
                    layerwise=cfg.layerwise, activation_checkpointing=cfg.activation_checkpointing, device=device)
    return MemoryTrace(settings, peak, _categories(snapshot, ref), phase,
                       {k: resident[k] for k in ("weights", "optimizer_state")}, time.perf_counter() - start)


def build_step(cfg, device="cpu"):
    """(model, optimizer) of a traced config, built as ``fullrank pretrain`` builds them (on fake
    tensors when called under ``FakeTensorMode``; with real ones otherwise, for checks)."""
    from transformers import LlamaForCausalLM

    from ..train import config as C
    from ..train.models import model_config, projected_linears
    from ..train.setup import make_optimizer, prepare_model

    mconfig = model_config(cfg.model)
    with torch.device(device):
        net = _build(LlamaForCausalLM, mconfig, torch.float32 if cfg.weights == "fp32" else torch.bfloat16)
        C.validate_against_model(cfg, mconfig, projected_linears(net, cfg.target_modules))
        net = prepare_model(net, cfg)
        net.train()
        return net, make_optimizer(cfg, net)


def training_iterations(net, optimizer, cfg, device="cpu", *, mark=lambda phase: None, before=lambda i: None,
                        after=lambda i: None) -> None:
    """``ITERATIONS`` iterations of ``fullrank pretrain``'s step on random tokens: forward (bf16
    autocast for fp32 weights), backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``."""
    vocab = net.config.vocab_size
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if cfg.weights == "fp32" \
        else contextlib.nullcontext
    with torch.device(device):
        for iteration in range(1, ITERATIONS + 1):
            before(iteration)
            mark(f"forward {iteration}")
            x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len))
            with autocast():
                loss = net(input_ids=x, labels=x).loss
            mark(f"backward {iteration}")
            loss.backward()
            del loss, x
            mark(f"optimizer step {iteration}")
            optimizer.step()
            mark(f"zero_grad {iteration}")
            optimizer.zero_grad(set_to_none=True)
            after(iteration)


def _build(model_class, mconfig, dtype):
    """The model made in ``dtype`` (a fake parameter cannot be converted in place: it holds weak references)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_class(mconfig)
    finally:
        torch.set_default_dtype(default)


def _restart_peak(tracker) -> None:
    """Start a new peak at the current memory (MemTracker keeps one peak for its whole context)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def adamw_settings(settings: dict) -> dict:
    """The AdamW baseline of a trace: torch.optim.AdamW with 32-bit states, not layer-wise; the same
    model, batch, sequence length and checkpointing, bf16-sr weights as bf16 (AdamW rounds to nearest)."""
    return dict(model=settings["model"], method="adamw", batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                weights="bf16" if settings["weights"] == "bf16-sr" else settings["weights"], states="32bit",
                layerwise=False, activation_checkpointing=settings["activation_checkpointing"], device=settings["device"])


def largest_batch(budget_bytes: float, first: MemoryTrace, **settings) -> dict:
    """The largest batch whose traced peak fits ``budget_bytes`` (0: not even one sequence).

    Activations grow linearly with the batch: the peaks at ``first``'s batch b and at 2b give a line,
    the line gives the candidate, and one more trace checks it. At a small batch the peak can be
    the optimizer step's, which does not grow: the line is then refitted through the two largest
    batches traced, until a batch fits and the next one is known, or predicted, not to.
    """
    b1 = first.settings["batch_size"]
    known = {b1: first.peak_bytes, 2 * b1: trace(**{**settings, "batch_size": 2 * b1}).peak_bytes}

    def line():
        (ba, pa), (bb, pb) = sorted(known.items())[-2:]
        slope = max((pb - pa) / (bb - ba), 1.0)
        return slope, pb - slope * bb

    for _ in range(8):
        slope, fixed = line()
        best = max((b for b, p in known.items() if p <= budget_bytes), default=0)
        miss = min((b for b, p in known.items() if p > budget_bytes), default=math.inf)
        if miss == best + 1 or (best and best == max(known) and fixed + slope * (best + 1) > budget_bytes):
            break
        candidate = int(math.floor((budget_bytes - fixed) / slope))
        candidate = min(max(candidate, best + 1), miss - 1) if miss < math.inf else max(candidate, best + 1)
        if candidate in known:
            if known[candidate] <= budget_bytes and fixed + slope * (candidate + 1) > budget_bytes:
                break
            candidate = (best + miss) // 2 if miss < math.inf else 2 * max(best, 1)
        if candidate <= best:
            break
        known[candidate] = trace(**{**settings, "batch_size": candidate}).peak_bytes
    best = max((b for b, p in known.items() if p <= budget_bytes), default=0)
    slope, fixed = line()
    return dict(largest_batch_size=best, peak_bytes_at_largest=known.get(best), bytes_per_sequence=slope,
                fixed_bytes=fixed, traces=len(known))
