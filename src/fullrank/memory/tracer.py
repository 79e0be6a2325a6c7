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

**Sharded** (``fsdp=True``, ``nproc`` ranks): the step of ``fullrank pretrain --fsdp`` on a GPU,
traced as one rank (rank 0 unless ``traced_rank``) of a fake process group (torch's ``fake``
backend: collectives move nothing and return at once). The model is sharded by the same
``fullrank.train.fsdp.shard_model`` (every decoder layer and the root, GPU policy: bf16 compute,
fp32 gradient reduction) and the optimizer is built on the DTensor shards; torch's
``FSDPMemTracker`` follows FSDP's buffers. Two more categories: ``all_gathered_layers`` (the
unsharded parameters of the layers being computed, and the all-gather buffers they are copied out
of) and ``reduce_scatter_inputs`` (the whole gradients of a layer before the reduce-scatter, and
its input buffer). ``weights`` and ``gradients`` are then the rank's shards. The optimizer's own
collectives run too: in a refresh each due gradient is gathered whole to its owner rank, one per
owner at a time, so the gathered copy is among the owner's temporaries, and so is the exact SVD's
own copy of its input (torch clones the matrix inside the op for LAPACK or cuSOLVER, below any
tracker; it is added at that op, for a refresh that is a step's peak).
FSDP2 keeps ⌈m/N⌉ rows of storage for an m-row weight on every rank; the last ranks use fewer
rows and keep less optimizer state: rank 0 is the heaviest or as heavy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
import warnings
from pathlib import Path

import torch

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries")
# the sharded traces' communication buffers (FSDP2), after CATEGORIES
COMMUNICATION_CATEGORIES = ("all_gathered_layers", "reduce_scatter_inputs")
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


def _tracker_class(sharded: bool = False):
    """``MemTracker`` (``FSDPMemTracker`` when ``sharded``) with the optimizer step's allocations
    counted as temporaries until the step ends and finds them in ``optimizer.state`` (torch counts
    every step allocation as state); returns the class and its category enum."""
    if sharded:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker as Base
        from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType as Ref
    else:
        from torch.distributed._tools.mem_tracker import MemTracker as Base
        from torch.distributed._tools.mem_tracker import _MemRefType as Ref

    class StepMemTracker(Base):
        phase = "setup"
        peak_phase = "setup"
        untracked = 0  # > 0: inside DTensor's sharding propagation (see untracked_sharding_propagation)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.untracked:
                return func(*args, **(kwargs or {}))
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if sharded and func is torch.ops.aten._linalg_svd.default and out is not NotImplemented:
                self._kernel_copy(args[0])
            return out

        def _kernel_copy(self, t) -> None:
            """The SVD kernel's own copy of its input (LAPACK and cuSOLVER overwrite the matrix they
            factor; torch clones it inside the op, where no tracker sees it), alive with the outputs
            until the op returns: counted as a temporary at that moment."""
            snap = self._curr_mem_snap.get(t.device)
            if snap is None:
                return
            nbytes = t.numel() * t.element_size()
            snap[Ref.TEMP] = snap.get(Ref.TEMP, 0) + nbytes
            snap["Total"] += nbytes
            self._update_peak_stats(None)
            snap[Ref.TEMP] -= nbytes
            snap["Total"] -= nbytes

        def _track(self, reftype, t):
            super()._track(Ref.TEMP if reftype is Ref.OPT else reftype, t)

        def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
            if t is None:  # a layer-wise hook freed the gradient before the tracker's own hook ran
                return set()
            return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

        if sharded:
            def _fsdp_param_group_post_backward(self, fsdp_mod, original):
                """torch's wrapper of FSDP's post-backward (categories before and after it), less one
                reference: torch's keeps the group's last unsharded gradient in a local variable
                until the post-backward returns, which no real run has. FSDP frees the unsharded
                gradients once they are copied into the reduce-scatter input, and the trace then
                frees them where the installed torch's real step does (docs/benchmarks.md)."""
                from torch.distributed._tools.fsdp2_mem_tracker import _FSDPModState, _FSDPState

                @functools.wraps(original)
                def post_backward(*args, **kwargs):
                    group = fsdp_mod._get_fsdp_state()._fsdp_param_group
                    self._track_group_grads(group, "_unsharded_param", Ref.UNSHARDED_GRAD)
                    snapshots = self.memory_tracking[fsdp_mod].snapshots
                    snapshots.setdefault(_FSDPModState.BEF_POST_BW, []).append(self.get_tracker_snapshot())
                    self._fsdp_state = _FSDPState.POST_BW
                    original(*args, **kwargs)
                    self._track_group_grads(group, "sharded_param", Ref.SHARDED_GRAD)
                    snapshots.setdefault(_FSDPModState.AFT_POST_BW, []).append(self.get_tracker_snapshot())

                return post_backward

            def _track_group_grads(self, group, attribute, reftype) -> None:
                """Categorize the gradients of ``group``'s parameters (``attribute``: the unsharded or
                the sharded ones) without holding any of them after the call."""
                for fsdp_param in group.fsdp_params if group else ():
                    if getattr(fsdp_param, attribute).grad is not None:
                        self._update_and_maybe_create_winfos(getattr(fsdp_param, attribute).grad, reftype,
                                                             update_existing=reftype is Ref.UNSHARDED_GRAD)

        def _update_peak_stats(self, peak_state):
            # the global peak only: torch's also updates every module's peak (not reported here), at
            # a cost that grows with the number of modules and took most of a 7B trace's time
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                    self.peak_phase = self.phase

    return StepMemTracker, Ref


def _categories(snapshot: dict, ref) -> dict:
    """A MemTracker device snapshot as bytes per category of ``CATEGORIES`` (and, for an
    ``FSDPMemTracker``'s, of ``COMMUNICATION_CATEGORIES``)."""
    get = lambda *keys: sum(int(snapshot.get(k, 0)) for k in keys)  # noqa: E731
    if hasattr(ref, "SHARDED_PARAM"):
        return {
            "weights": get(ref.SHARDED_PARAM, ref.BUFFER),
            "gradients": get(ref.SHARDED_GRAD),
            "optimizer_state": get(ref.OPT),
            "activations": get(ref.ACT),
            "temporaries": get(ref.TEMP, ref.INP),
            "all_gathered_layers": get(ref.UNSHARDED_PARAM, ref.ALL_GATHER),
            "reduce_scatter_inputs": get(ref.UNSHARDED_GRAD, ref.REDUCE_SCATTER),
        }
    return {
        "weights": get(ref.PARAM, ref.BUFFER),
        "gradients": get(ref.GRAD),
        "optimizer_state": get(ref.OPT),
        "activations": get(ref.ACT),
        "temporaries": get(ref.TEMP, ref.OTH),
    }


@contextlib.contextmanager
def quiet_tracker():
    """torch's module tracker (inside ``MemTracker``) warns "The module hierarchy tracking maybe be
    messed up" whenever a module's forward starts while a module *of the same name* is running:
    transformers wraps ``apply_rotary_pos_emb`` in a ``Func`` module of the ``kernels`` hub, whose
    forward calls another ``Func``, and a module outside the model's tree is named by its class, so
    the two share the name "Func" — once per attention layer. The tracker's per-module statistics
    are not used here (only the global peak), so exactly that warning is dropped: its category and
    module, inside this context; and the tracker's global ``warnings.formatwarning`` is restored.
    ``FSDPMemTracker`` registers a step pre-hook on the optimizer to mark the step; on a layer-wise
    optimizer that draws its warning that such a hook sees no gradients (attributed to the
    tracker's module, which warns nothing else): dropped too, since the marker needs none."""
    formatwarning = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\._tools\.mod_tracker\Z")
        warnings.filterwarnings("ignore", category=UserWarning,
                                module=r"torch\.distributed\._tools\.fsdp2_mem_tracker\Z")
        try:
            yield
        finally:
            warnings.formatwarning = formatwarning


@contextlib.contextmanager
def untracked_sharding_propagation(tracker):
    """Leave DTensor's sharding propagation out of ``tracker``. To find an op's output shape, DTensor
    runs the op once on whole-shape tensors under the active fake mode, which in a trace is the
    trace's own ``FakeTensorMode``: the tracker would count those whole-shape tensors, on the first
    call of each op only (DTensor caches the result), i.e. more on a process's first trace than on
    its next. Nothing of it exists on a real run (it is metadata)."""
    try:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
    except ImportError:  # pragma: no cover - torch without DTensor
        yield
        return
    original = ShardingPropagator.__dict__.get("_propagate_tensor_meta_non_cached")
    if original is None:  # pragma: no cover - another torch layout: counted as before
        yield
        return

    def untracked(self, *args, **kwargs):
        tracker.untracked += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.untracked -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


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
                 target_modules=("self_attn", "mlp"), optim_args=None, fsdp=False):
    """The ``TrainConfig`` of a traced step (checked as ``fullrank pretrain`` checks its flags)."""
    from ..train import config as C
    from ..train.errors import ConfigError

    if method not in C.engine_methods():
        raise ConfigError(f"--method: unknown method '{method}' for memory; allowed: {', '.join(C.engine_methods())}")
    values = dict(model=resolve_model(str(model)), method=method, rank=rank, batch_size=batch_size, grad_accum=1,
                  seq_len=seq_len, weights=weights, states=states, layerwise=bool(layerwise),
                  activation_checkpointing=bool(activation_checkpointing), target_modules=list(target_modules),
                  update_proj_gap=1, optim_args=dict(optim_args or {}), recipe="cpu", device="cpu", out_dir=".")
    if fsdp:
        values["fsdp"] = True
    values = {k: v for k, v in values.items() if v is not None}
    cfg = C.build({k: C.coerce(k, v, "--" + k.replace("_", "-")) for k, v in values.items()})
    return C.finalize(cfg)


def check_ranks(nproc, fsdp: bool, traced_rank: int = 0) -> None:
    """``--nproc`` needs ``--fsdp``; ``traced_rank`` is one of the ``nproc`` ranks."""
    from ..train.errors import ConfigError

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer (ranks), got {nproc!r}")
    if nproc > 1 and not fsdp:
        raise ConfigError(
            f"--nproc {nproc} without --fsdp: under DDP every rank holds the whole model, its gradients and the "
            "optimizer state, i.e. the one-process peak (fullrank memory without --nproc) plus DDP's gradient "
            "buckets (a second copy of the gradients); add --fsdp to trace a sharded step, or drop --nproc")
    if isinstance(traced_rank, bool) or not isinstance(traced_rank, int) or not 0 <= traced_rank < nproc:
        raise ConfigError(f"traced_rank must be in [0, {nproc - 1}] (a rank of --nproc {nproc}), got {traced_rank!r}")


def checked_config(model, method, *, device="cpu", nproc=1, fsdp=False, traced_rank=0, **settings):
    """The device, the ranks and the flags of a trace checked; its ``TrainConfig``."""
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        from ..train.errors import ConfigError

        raise ConfigError(f"--device: '{device}' is not available here; allowed: cpu"
                          + (", cuda" if torch.cuda.is_available() else " (no CUDA device)"))
    check_ranks(nproc, fsdp, traced_rank)
    return trace_config(model, method, fsdp=fsdp, **settings)


def trace(model="llama_7b", method="fira", *, rank=None, batch_size=1, seq_len=256, weights="fp32", states="32bit",
          layerwise=False, activation_checkpointing=False, target_modules=("self_attn", "mlp"), optim_args=None,
          device="cpu", nproc=1, fsdp=False, traced_rank=0) -> MemoryTrace:
    """Trace two training iterations of ``model`` with ``method`` on fake tensors; see the module doc.

    ``model``: llama_tiny … llama_70b, a LlamaConfig .json or a Hugging Face model folder; ``method``:
    any ``fullrank.make_optimizer`` name; ``weights``: fp32 (bf16 autocast), bf16 or bf16-sr;
    ``states``: 32bit or 8bit; ``device``: the fake tensors' device (cpu, or cuda where there is one).
    ``fsdp``: the FSDP2 step of ``nproc`` ranks, traced as rank ``traced_rank`` (``batch_size``
    sequences per rank); ``nproc`` > 1 needs ``fsdp``.
    Raises ``fullrank.train.errors.ConfigError`` (one line) on a bad setting.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = checked_config(model, method, rank=rank, batch_size=batch_size, seq_len=seq_len, weights=weights,
                         states=states, layerwise=layerwise, activation_checkpointing=activation_checkpointing,
                         target_modules=target_modules, optim_args=optim_args, device=device, nproc=nproc,
                         fsdp=fsdp, traced_rank=traced_rank)
    start = time.perf_counter()
    Tracker, ref = _tracker_class(sharded=bool(fsdp))
    peaks = []
    with quiet_tracker(), fake_process_group(nproc, traced_rank, device) if fsdp else contextlib.nullcontext() as mesh:
        with FakeTensorMode():
            net, optimizer = build_step(cfg, device, mesh=mesh)
            if fsdp:
                _fsdp_lazy_init(net)
                tracker = Tracker(net, optimizer)
            else:
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

            with tracker, untracked_sharding_propagation(tracker) if fsdp else contextlib.nullcontext():
                try:
                    training_iterations(net, optimizer, cfg, device, mark=mark, before=before, after=after)
                except (ValueError, TypeError, NotImplementedError) as err:
                    if not fsdp:
                        raise
                    from ..train.setup import refused  # the engine's refusals on FSDP2 shards come in the step

                    raise refused(cfg, err) from None
                current = next(iter(tracker.get_tracker_snapshot("current").values()), {})
            del net, optimizer, tracker
    # the larger iteration peak; on a tie the later one, whose split sees the optimizer state in place
    peak, phase, snapshot = max(reversed(peaks), key=lambda p: p[0])
    resident = _categories(current, ref)
    settings = dict(model=str(model), method=cfg.optim.method, rank=cfg.optim.rank if cfg.optim.method not in ("adamw", "adamw8bit") else None,
                    batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, weights=cfg.precision.weights, states=cfg.precision.states,
                    layerwise=cfg.optim.layerwise, activation_checkpointing=cfg.precision.activation_checkpointing, device=device)
    if fsdp:
        settings.update(nproc=nproc, fsdp=True, traced_rank=traced_rank)
    return MemoryTrace(settings, peak, _categories(snapshot, ref), phase,
                       {k: resident[k] for k in ("weights", "optimizer_state")}, time.perf_counter() - start)


def check_settings(model="llama_7b", method="fira", *, rank=None, batch_size=1, seq_len=256, weights="fp32",
                   states="32bit", layerwise=False, activation_checkpointing=False, target_modules=("self_attn", "mlp"),
                   optim_args=None, device="cpu", nproc=1, fsdp=False, traced_rank=0) -> None:
    """The checks of ``trace`` that need no trace, as ``fullrank pretrain`` checks its inputs before
    it starts: the flags, the ranks, the model's shapes against rank and sequence length, and (one
    process) the optimizer built on a meta-device model. An engine refusal that only the step sees
    (8-bit states or stochastic rounding on FSDP2 shards) comes from ``trace``."""
    from transformers import LlamaForCausalLM

    from ..train import config as C
    from ..train.models import model_config, projected_linears
    from ..train.setup import make_optimizer, prepare_model

    cfg = checked_config(model, method, rank=rank, batch_size=batch_size, seq_len=seq_len, weights=weights,
                         states=states, layerwise=layerwise, activation_checkpointing=activation_checkpointing,
                         target_modules=target_modules, optim_args=optim_args, device=device, nproc=nproc,
                         fsdp=fsdp, traced_rank=traced_rank)
    mconfig = model_config(cfg.model.name)
    with torch.device("meta"):
        net = _build(LlamaForCausalLM, mconfig, torch.float32 if cfg.precision.weights == "fp32" else torch.bfloat16)
    C.validate_against_model(cfg, mconfig, projected_linears(net, cfg.optim.target_modules))
    if not fsdp:
        make_optimizer(cfg, prepare_model(net, cfg))


@contextlib.contextmanager
def fake_process_group(nproc: int, traced_rank: int = 0, device: str = "cpu"):
    """A fake default process group of ``nproc`` ranks, this process being ``traced_rank``, and its
    1-D ``DeviceMesh`` (yielded; made here, outside ``FakeTensorMode``); destroyed on exit."""
    import torch.distributed as dist

    from ..train.errors import ConfigError

    if not dist.is_available():
        raise ConfigError("--fsdp: torch.distributed is not available in this build of PyTorch")
    if dist.is_initialized():
        raise ConfigError("--fsdp: a sharded trace runs on a fake process group of its own, and this process has "
                          "initialized torch.distributed already; trace in a process without a process group")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    excepthook = sys.excepthook  # init_process_group wraps it to prefix tracebacks with "[rank0]:", for good
    dist.init_process_group("fake", store=FakeStore(), rank=traced_rank, world_size=nproc)
    try:
        yield init_device_mesh(device, (nproc,))
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


def build_step(cfg, device="cpu", mesh=None):
    """(model, optimizer) of a traced config, built as ``fullrank pretrain`` builds them (on fake
    tensors when called under ``FakeTensorMode``; with real ones otherwise, for checks). With
    ``cfg.run.fsdp`` the model is sharded over ``mesh`` with the GPU's policy (bf16 compute, fp32
    reduction) before the optimizer is made on its shards."""
    from transformers import LlamaForCausalLM

    from ..train import config as C
    from ..train.models import model_config, projected_linears
    from ..train.setup import make_optimizer, prepare_model

    mconfig = model_config(cfg.model.name)
    with torch.device(device):
        net = _build(LlamaForCausalLM, mconfig, torch.float32 if cfg.precision.weights == "fp32" else torch.bfloat16)
        C.validate_against_model(cfg, mconfig, projected_linears(net, cfg.optim.target_modules))
        net = prepare_model(net, cfg)
        if cfg.run.fsdp:
            from ..train.fsdp import shard_model

            shard_model(net, torch.device(device), bf16=True, mesh=mesh)
        net.train()
        return net, make_optimizer(cfg, net)


def training_iterations(net, optimizer, cfg, device="cpu", *, mark=lambda phase: None, before=lambda i: None,
                        after=lambda i: None) -> None:
    """``ITERATIONS`` iterations of ``fullrank pretrain``'s step on random tokens: forward (bf16
    autocast for fp32 weights), backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``."""
    vocab = net.config.vocab_size
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if cfg.precision.weights == "fp32" \
        else contextlib.nullcontext
    with torch.device(device):
        for iteration in range(1, ITERATIONS + 1):
            before(iteration)
            mark(f"forward {iteration}")
            x = torch.randint(0, vocab, (cfg.data.batch_size, cfg.data.seq_len))
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


def _fsdp_lazy_init(net) -> None:
    """Run FSDP2's lazy initialisation (done by the first forward) before tracking starts. It pads
    each sharded weight's local rows again unless they already lie in the padded storage, which it
    tests by data pointer; a fake tensor has none, so on fake tensors it copies the last ranks'
    unevenly split weights (fewer rows) into new storages, which a tracker started earlier would
    count as activations of the first forward instead of weights."""
    state = getattr(net, "_get_fsdp_state", None)
    lazy_init = getattr(state(), "_lazy_init", None) if state is not None else None
    if lazy_init is not None:
        lazy_init()


def _restart_peak(tracker) -> None:
    """Start a new peak at the current memory (MemTracker keeps one peak for its whole context)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def adamw_settings(settings: dict) -> dict:
    """The AdamW baseline of a trace: torch.optim.AdamW with 32-bit states, not layer-wise; the same
    model, batch, sequence length, checkpointing and ranks (FSDP2), bf16-sr weights as bf16 (AdamW
    rounds to nearest)."""
    baseline = dict(model=settings["model"], method="adamw", batch_size=settings["batch_size"],
                    seq_len=settings["seq_len"], weights="bf16" if settings["weights"] == "bf16-sr" else settings["weights"],
                    states="32bit", layerwise=False, activation_checkpointing=settings["activation_checkpointing"],
                    device=settings["device"])
    if settings.get("fsdp"):
        baseline.update(nproc=settings["nproc"], fsdp=True)
    return baseline


def largest_batch(budget_bytes: float, first: MemoryTrace, *, on_trace=None, **settings) -> dict:
    """The largest batch whose traced peak fits ``budget_bytes`` (0: not even one sequence).

    Activations grow linearly with the batch: the peaks at ``first``'s batch b and at 2b give a line,
    the line gives the candidate, and one more trace checks it. At a small batch the peak can be
    the optimizer step's, which does not grow: the line is then refitted through the two largest
    batches traced, until a batch fits and the next one is known, or predicted, not to.
    ``on_trace`` is called with each new ``MemoryTrace`` (progress).
    """
    def traced(batch_size: int) -> int:
        result = trace(**{**settings, "batch_size": batch_size})
        if on_trace is not None:
            on_trace(result)
        return result.peak_bytes

    b1 = first.settings["batch_size"]
    known = {b1: first.peak_bytes, 2 * b1: traced(2 * b1)}

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
        known[candidate] = traced(candidate)
    best = max((b for b, p in known.items() if p <= budget_bytes), default=0)
    slope, fixed = line()
    return dict(largest_batch_size=best, peak_bytes_at_largest=known.get(best), bytes_per_sequence=slope,
                fixed_bytes=fixed, traces=len(known))


def rank_counts(max_nproc: int) -> list[int]:
    """The rank counts a search tries: 1, 2, 4, … up to ``max_nproc``, and ``max_nproc`` itself."""
    counts = [1 << k for k in range(max_nproc.bit_length()) if 1 << k <= max_nproc]
    return counts if counts[-1] == max_nproc else [*counts, max_nproc]


def fewest_ranks(budget_bytes: float, max_nproc: int, *, on_trace=None, **settings) -> tuple[dict, MemoryTrace]:
    """The fewest FSDP2 ranks among ``rank_counts(max_nproc)`` whose traced per-rank peak fits
    ``budget_bytes``, at the batch of ``settings`` (per rank). Every sharded part of the peak shrinks
    as 1/N and the rest (the layers being computed, activations) does not grow with N, so the
    counts are tried in increasing order and the search stops at the first that fits. Returns the
    search (``fewest_nproc``: 0 when none fits) and the trace at the count it ended on."""
    tried = []
    for nproc in rank_counts(max_nproc):
        result = trace(**{**settings, "nproc": nproc, "fsdp": True})
        if on_trace is not None:
            on_trace(result)
        tried.append(dict(nproc=nproc, peak_bytes=result.peak_bytes, seconds=result.seconds))
        if result.peak_bytes <= budget_bytes:
            return dict(fewest_nproc=nproc, max_nproc=max_nproc, tried=tried), result
    return dict(fewest_nproc=0, max_nproc=max_nproc, tried=tried), result
