"""Every GPU measurement of the engine v2 issue in one command (≤ 8 minutes on one H100 before section 7).

Prints and writes JSON (``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``bench/results/gpu_check.json``) with:

1. **op counts**: top-level ``aten::`` ops of one steady step (``bench/op_count.py``) of AdamW
   (foreach), GaLore, Fira, APOLLO and AdaRankGrad at 2, 6 and 12 layers of LLaMA-130M shapes;
2. **optimizer step**: steady and amortised (T = 200) ``step()`` of torch AdamW (foreach and fused),
   our GaLore, Fira (eager and ``compile=True``) and APOLLO, and the official ``galore-torch`` 1.0,
   ``fira`` 1.0.2 and ``apollo-torch`` 1.0.3, at LLaMA-130M and LLaMA-1B shapes (all weights,
   rank 256 / 512, fp32 parameters with fixed random gradients);
3. **refresh**: all 84 projected matrices of LLaMA-130M at rank 256 — exact SVD one matrix at a time
   (engine v1), batched exact, batched randomized and batched warm (1 iteration); and the
   **transient memory** of a steady Fira step at LLaMA-7B's matrix shapes (bf16) per ``bucket_cap_mb``;
4. **end to end**: LLaMA-350M (paper Table 5), rank 256, α = 0.25, bf16 autocast, sequence 256,
   random tokens (no data travels): tokens/s of the steady steps, amortised over T = 200 with a timed
   refresh step, and ``torch.cuda.max_memory_allocated``, for AdamW, GaLore and Fira — the analogue
   of the paper's Table r8;
5. **FSDP2 on one GPU** (``bench/fsdp.py --processes 1``): the optimizer step of AdamW, Fira, GaLore
   and APOLLO at LLaMA-130M shapes on FSDP2-sharded weights (a mesh of one GPU: the DTensor path's
   cost, no traffic) beside the same step on plain weights;
6. **the memory tracer** (``memory_trace_check``): ``fullrank memory``'s traced peak (fake
   CUDA tensors) against ``torch.cuda.max_memory_allocated`` of the same two iterations run for real,
   llama_350m and llama_1b, batch 4 x 256, AdamW fp32 / Fira bf16 layer-wise / GaLore bf16 with
   activation checkpointing (target: within 5%). Alone: ``--skip ops step refresh memory e2e fsdp
   capturable titan``;
7. **capturable steady steps** (``capturable_steps``): the median steady ``step()`` (10 timed steps,
   all before the refresh at T = 200; the warm-up's first step is the refresh) at LLaMA-130M shapes
   (all weights, rank 256, α = 0.25), bf16 and fp32 parameters with fixed random gradients, of torch
   AdamW fused (the baseline) and foreach, and of our Fira and GaLore eager, ``capturable=True,
   nonfinite="skip"``, the same with ``compile=True``, and ``torch.compile(opt.step, fullgraph=True)``
   of a capturable optimizer (on CUDA also ``mode="reduce-overhead"``: CUDA graphs), each against
   AdamW fused in its dtype; compile times, recompiles (and their guard) and graph breaks recorded
   apart, a failing variant's error recorded. Compiled variants not started within
   ``--capturable-budget`` seconds (90) of the section's start are skipped. Alone: ``--skip ops step
   refresh memory e2e fsdp trace titan``;
8. **torchtitan** (``titan_trainer``): ``torchrun -m torchtitan.train`` (NCCL, one GPU) on torchtitan's
   Llama 3 debug model with the T5 tokenizer and the offline corpus, 20 steps of torchtitan's own AdamW
   (``llama3_debugmodel``) and of fullrank's Fira (``--module fullrank.titan``'s
   ``llama3_debugmodel_fira``): loss, tokens/s and peak reserved memory per step from torchtitan's
   metrics; the Fira run checkpoints at step 10 and a third run resumes from it (fullrank's state through
   torchtitan's DCP checkpointer), its losses against the uninterrupted run's. Needs the torchtitan wheels
   (below). Alone: ``--skip ops step refresh memory e2e fsdp trace capturable``.

Targets: Fira's amortised step ≤ 2× AdamW (foreach) at LLaMA-130M shapes; the 84-matrix
refresh ≤ 0.3 s; Fira's end-to-end throughput ≥ 97% of AdamW's at LLaMA-350M; ops ≤ 3× AdamW's;
a Fira steady step (its best variant) ≤ 1.0× AdamW fused with bf16 parameters at LLaMA-130M shapes.

The device has torch and transformers but no internet: the three official packages travel as wheels
(pure Python; their ``__init__`` imports bitsandbytes for 8-bit variants, so their modules are
loaded directly and bitsandbytes is not needed). Prepare once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip wheel --no-deps -w .whl fira==1.0.2 galore-torch==1.0 apollo-torch==1.0.3

and, for section 8, torchtitan and the dependencies the device lacks (pure Python, 2 MB; triton comes
with CUDA torch, and torchtitan's trainer also imports datasets and tensorboard):

    python3 -m pip wheel --no-deps -w .whl torchtitan==0.3.0 tyro torchdata torch_checkpointing \
      spmd_types==0.2.3 einops docstring_parser typeguard

then run with ``carry=[".whl"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

Without a GPU, ``python bench/gpu_check.py --device cpu --quick`` runs every section at toy sizes
(that is how it is tested).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402
import op_count  # noqa: E402

import fullrank  # noqa: E402
from fullrank.optim.units.svd import exact_svd, randomized_svd, warm_subspace  # noqa: E402

GAP = 200
TARGETS = {"fira_amortised_vs_adamw_foreach_130m": 2.0, "refresh_84_matrices_s": 0.3,
           "fira_throughput_vs_adamw_350m": 0.97, "ops_vs_adamw": 3.0, "memory_trace_max_abs_error": 0.05,
           "fira_steady_vs_adamw_fused_bf16_130m": 1.0}
SHAPES = {  # hidden, intermediate, layers, rank
    "llama_130m": (768, 2048, 12, 256),
    "llama_1b": (2048, 5461, 24, 512),
}
QUICK_SHAPES = {"llama_130m": (64, 160, 2, 16), "llama_1b": (96, 256, 2, 24)}
CAPTURABLE_QUICK_SHAPE = (32, 64, 1, 8)  # one layer: compiling on a CPU is slow


def official_modules() -> dict[str, types.ModuleType]:
    """The official packages' optimizer modules, imported without their ``__init__`` (bitsandbytes)."""
    out = {}
    for package, module in (("galore_torch", "adamw"), ("fira", "fira_adamw"), ("apollo_torch", "apollo")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        alias = f"_{package}_plain"
        if alias not in sys.modules:
            shell = types.ModuleType(alias)
            shell.__path__ = list(spec.submodule_search_locations)
            sys.modules[alias] = shell
        try:
            out[package] = importlib.import_module(f"{alias}.{module}")
        except ImportError as err:
            print(f"  (skipping {package}: {err})")
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, reps: int) -> float:
    samples = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ---------------------------------------------------------------------------- 1. op counts
def op_counts(device, layers_list) -> list[dict]:
    rows = []
    for layers in layers_list:
        adamw = op_count.count_steady(fullrank, "adamw_foreach", layers, device)
        for method in ("galore", "fira", "apollo", "adarankgrad"):
            ops = op_count.count_steady(fullrank, method, layers, device)
            rows.append(dict(method=method, layers=layers, ops=ops, adamw_ops=adamw, ratio=ops / adamw))
            print(f"  ops {method:12s} layers {layers:2d}: {ops:5d} ({ops / adamw:.2f}× AdamW's {adamw})", flush=True)
    return rows


# ---------------------------------------------------------------------------- 2. optimizer step
def weights(shape, device, dtype, seed=0):
    hidden, inter, layers, _ = shape
    gen = torch.Generator().manual_seed(seed)
    named = []
    for name, size, projected in tm.llama_weight_shapes(layers, hidden, inter, 32000):
        p = torch.nn.Parameter((torch.randn(size, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(size, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        named.append((name, p, projected))
    return named


def optimizers(named, rank, official) -> dict:
    proj = [p for _, p, pr in named if pr]
    plain = [p for _, p, pr in named if not pr]
    every = [p for _, p, _ in named]

    def ours():
        return [dict(params=proj, rank=rank, update_proj_gap=GAP), dict(params=plain)]

    def theirs(key):
        return [{"params": proj, "rank": rank, "update_proj_gap": GAP, key: 0.25, "proj_type": "std"},
                {"params": plain}]

    opts = {
        "adamw_foreach": lambda: torch.optim.AdamW(every, lr=1e-3, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(every, lr=1e-3, fused=True),
        "galore": lambda: fullrank.GaLore(ours(), lr=1e-3),
        "fira": lambda: fullrank.Fira(ours(), lr=1e-3),
        "fira_compiled": lambda: fullrank.Fira(ours(), lr=1e-3, compile=True),
        "apollo": lambda: fullrank.APOLLO(ours(), lr=1e-3),
    }
    if "galore_torch" in official:
        opts["galore-torch"] = lambda: official["galore_torch"].AdamW(theirs("scale"), lr=1e-3, no_deprecation_warning=True)
    if "fira" in official:
        opts["fira (official)"] = lambda: official["fira"].AdamW(theirs("alpha"), lr=1e-3, no_deprecation_warning=True)
    if "apollo_torch" in official:
        opts["apollo-torch"] = lambda: official["apollo_torch"].AdamW(
            [{"params": proj, "rank": rank, "update_proj_gap": GAP, "scale": 1, "proj": "random", "proj_type": "std",
              "scale_type": "channel"}, {"params": plain}], lr=1e-3)
    return opts


def step_times(device, shape_name, shape, steps, official, dtype, refresh_reps: int = 2) -> dict:
    named = weights(shape, device, dtype)
    rows = {}
    for name, make in optimizers(named, shape[3], official).items():
        if name == "adamw_fused" and device.type != "cuda":
            continue
        opt = make()
        for _ in range(3):  # state, first subspaces, compilation
            opt.step()
        steady = median_time(opt.step, device, steps)
        row = {"steady_s": steady, "amortised_s": steady}
        if not name.startswith("adamw"):
            extras = []
            for _ in range(refresh_reps):
                tm.force_projection_refresh(opt, GAP)
                refresh = median_time(opt.step, device, 1)
                extras.append(refresh - median_time(opt.step, device, 1))
            row["refresh_extra_s"] = statistics.median(extras)
            row["amortised_s"] = steady + row["refresh_extra_s"] / GAP
        rows[name] = row
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows["adamw_foreach"]["amortised_s"]
    for name, row in rows.items():
        row["amortised_vs_adamw_foreach"] = row["amortised_s"] / base
        print(f"  {shape_name} {name:18s} steady {row['steady_s'] * 1e3:8.2f} ms  amortised "
              f"{row['amortised_s'] * 1e3:8.2f} ms  ({row['amortised_vs_adamw_foreach']:.2f}× AdamW foreach)", flush=True)
    return rows


# ---------------------------------------------------------------------------- 3. refresh
def refresh_times(device, shape, reps) -> dict:
    named = weights(shape, device, torch.float32)
    rank = shape[3]
    grads = [p.grad for _, p, pr in named if pr]
    by_shape: dict[tuple, list] = {}
    for g in grads:
        by_shape.setdefault(tuple(g.shape), []).append(g)
    stacks = {s: torch.stack(gs) for s, gs in by_shape.items()}
    previous = {s: exact_svd(st, rank) for s, st in stacks.items()}

    def side(s):
        return "right" if s[0] >= s[1] else "left"

    def per_matrix():
        for g in grads:
            exact_svd(g, rank)

    def batched_exact():
        for st in stacks.values():
            exact_svd(st, rank)

    def batched_randomized():
        for st in stacks.values():
            randomized_svd(st, rank)

    def batched_warm():
        for s, st in stacks.items():
            U, _, Vh = previous[s]
            warm_subspace(st, Vh if side(s) == "right" else U, side(s), 1)

    out = {"matrices": len(grads), "rank": rank}
    for name, fn in (("exact_per_matrix_v1", per_matrix), ("exact_batched", batched_exact),
                     ("randomized_batched", batched_randomized), ("warm1_batched", batched_warm)):
        fn()
        out[name + "_s"] = median_time(fn, device, reps)
        print(f"  refresh {len(grads)} matrices, {name:22s} {out[name + '_s']:.3f} s", flush=True)
    return out


# ---------------------------------------------------------------------------- 3b. transient memory
def transient_memory(device, quick: bool) -> dict:
    """Memory a steady Fira step allocates beyond the weights, gradients and state (CUDA's peak minus
    what was allocated before it), at LLaMA-7B's matrix shapes (4 layers, bf16), per ``bucket_cap_mb``:
    the docstring's bound is one bucket's stacked gradient plus its low-rank temporaries."""
    if device.type != "cuda":
        return {"skipped": "CUDA's allocator statistics are needed (torch.cuda.max_memory_allocated)"}
    shape = (256, 688, 2, 64) if quick else (4096, 11008, 4, 1024)
    out = {"shape": dict(hidden=shape[0], intermediate=shape[1], layers=shape[2], rank=shape[3], dtype="bfloat16")}
    for cap in (64, 256):
        named = weights(shape, device, torch.bfloat16)
        proj = [p for _, p, pr in named if pr]
        opt = fullrank.Fira([dict(params=proj, rank=shape[3], update_proj_gap=GAP)], lr=1e-3, bucket_cap_mb=cap)
        opt.step()
        opt.step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        sync(device)
        transient = torch.cuda.max_memory_allocated(device) - before
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in proj)
        largest = max(p.grad.numel() * p.grad.element_size() for p in proj)
        out[f"cap_{cap}_mib"] = dict(transient_mib=transient / 2**20, projected_gradients_mib=grad_bytes / 2**20,
                                     largest_matrix_mib=largest / 2**20, share_of_gradients=transient / grad_bytes)
        print(f"  transient of a Fira step, bucket_cap_mb={cap}: {transient / 2**20:.0f} MiB "
              f"({transient / grad_bytes:.1%} of {grad_bytes / 2**20:.0f} MiB of projected gradients)", flush=True)
        del named, proj, opt
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------- 4. end to end
def train_one(method: str, config, rank: int, seq: int, batch: int, steps: int, device) -> dict:
    """Tokens/s (steady and amortised over T) and peak memory of one method's training steps."""
    from fullrank.train.models import build_model

    model = build_model(config, seed=0).to(device)
    groups = fullrank.param_groups(model, rank=rank, update_proj_gap=GAP, scale=0.25)
    opt = fullrank.make_optimizer(method, groups, lr=1e-3)
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(4)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    counter = iter(range(10**9))

    def train_step():
        x = data[next(counter) % len(data)]
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        train_step()
    steady = median_time(train_step, device, steps)
    row = {"steady_step_s": steady, "tokens_per_s": batch * seq / steady}
    if method != "adamw":
        tm.force_projection_refresh(opt, GAP)
        refresh = median_time(train_step, device, 1)
        row["refresh_step_s"] = refresh
        row["amortised_tokens_per_s"] = batch * seq / (steady + (refresh - steady) / GAP)
    else:
        row["amortised_tokens_per_s"] = row["tokens_per_s"]
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["optimizer_state_gib"] = fullrank.memory.optimizer_state_bytes(opt) / 2**30
    print(f"  e2e {method:7s} {row['tokens_per_s']:9.0f} tok/s steady, {row['amortised_tokens_per_s']:9.0f} "
          f"amortised, peak {row.get('max_memory_allocated_gib', float('nan')):.2f} GiB, state "
          f"{row['optimizer_state_gib']:.3f} GiB", flush=True)
    return row


def end_to_end(device, quick: bool, steps: int, batch: int) -> dict:
    from fullrank.train.models import model_config

    config = model_config("llama_350m")
    if quick:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 160, 2
        config.num_attention_heads = config.num_key_value_heads = 4
    rank = 16 if quick else 256
    seq = 64 if quick else 256
    rows = {}
    for method in ("adamw", "galore", "fira"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rows[method] = train_one(method, config, rank, seq, batch, steps, device)
    base = rows["adamw"]["amortised_tokens_per_s"]
    for row in rows.values():
        row["throughput_vs_adamw"] = row["amortised_tokens_per_s"] / base
    return {"config": dict(model="llama_350m" if not quick else "toy", rank=rank, seq_len=seq, batch=batch,
                           dtype="bf16 autocast" if device.type == "cuda" else "fp32"), "methods": rows}


def fsdp_one_device(device, quick: bool, out_dir: Path) -> dict:
    """bench/fsdp.py in one process on ``device`` (its own process: it starts a process group)."""
    import subprocess
    target = out_dir / f"fsdp_{device.type}{'_quick' if quick else ''}.json"
    sizes = ["--layers", "1", "--rank", "32", "--gap", "4", "--steps", "2"] if quick else ["--gap", "6", "--steps", "4"]
    cmd = [sys.executable, str(Path(__file__).parent / "fsdp.py"), "--device", device.type, "--processes", "1",
           "--out", str(target), *sizes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    print(proc.stdout[-3000:], flush=True)
    return json.loads(target.read_text())


# ------------------------------------------------------------- 6. the memory tracer
TRACE_CASES = {  # name: settings of fullrank.memory.trace (and of the measured run)
    "adamw_fp32": dict(method="adamw", weights="fp32"),
    "fira_bf16_layerwise": dict(method="fira", weights="bf16", layerwise=True),
    "galore_bf16_checkpointing": dict(method="galore", weights="bf16", activation_checkpointing=True),
}
TRACE_TOLERANCE = 0.05


def measured_cuda_peak(model: str, batch_size: int, seq_len: int, device, **settings) -> int:
    """``torch.cuda.max_memory_allocated`` over the traced iterations, run for real (bytes, from the
    allocations alive before the model is built)."""
    from fullrank.memory.tracer import build_step, trace_config, training_iterations

    cfg = trace_config(model, batch_size=batch_size, seq_len=seq_len, **settings)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    net, optimizer = build_step(cfg, "cuda")
    training_iterations(net, optimizer, cfg, "cuda")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del net, optimizer
    torch.cuda.empty_cache()
    return peak


def memory_trace_check(device, quick: bool) -> dict:
    """The tracer (``fullrank memory``, fake tensors on the same device) against the real run's
    ``torch.cuda.max_memory_allocated`` for llama_350m and llama_1b (target: within 5%). On a CPU
    (``--device cpu --quick``) the measurement is bench/memory_check.py's profiler peak."""
    from fullrank.memory import trace

    models = ["llama_tiny"] if quick else ["llama_350m", "llama_1b"]
    batch, seq = (2, 32) if quick else (4, 256)
    rows = []
    for model in models:
        for case, settings in TRACE_CASES.items():
            traced = trace(model, batch_size=batch, seq_len=seq, device=device.type, **settings)
            if device.type == "cuda":
                measured = measured_cuda_peak(model, batch, seq, device, **settings)
            else:
                import memory_check

                measured = memory_check.profiled_peak(model, batch, seq, **settings)["peak_bytes"]
            error = traced.peak_bytes / measured - 1
            rows.append(dict(model=model, case=case, batch_size=batch, seq_len=seq, traced_bytes=traced.peak_bytes,
                             measured_bytes=measured, relative_error=error, within=abs(error) <= TRACE_TOLERANCE,
                             trace_seconds=traced.seconds, traced_by_category=traced.by_category))
            print(f"  trace {model:11s} {case:26s} traced {traced.peak_bytes / 2**30:7.3f} GiB, measured "
                  f"{measured / 2**30:7.3f} GiB ({error:+.2%})", flush=True)
    return {"tolerance": TRACE_TOLERANCE, "rows": rows,
            "max_abs_error": max(abs(r["relative_error"]) for r in rows)}


# ------------------------------------------------------------- 7. capturable steady steps
CAPTURABLE_DTYPES = (("bf16", torch.bfloat16), ("fp32", torch.float32))  # bf16 first: the goal's dtype
CAPTURABLE_GOAL = TARGETS["fira_steady_vs_adamw_fused_bf16_130m"]  # a Fira steady step vs AdamW fused, bf16
CAPTURABLE_WARMUP = 3  # eager steps before timing: the first is a refresh (synchronised); compile=True compiles here
COMPILED_WARMUP = 4  # calls of a torch.compile'd step before timing: compilation, recompilation, CUDA graph recording


def _projection_probe(opt):
    """A copy of the first projected matrix's subspace (None for AdamW): unchanged over the timed
    steps means that none of them refreshed."""
    for state in opt.state.values():
        for key in ("proj_left", "proj_right"):
            if isinstance(state.get(key), torch.Tensor):
                return state[key].detach().clone()
    return None


def _step_count(opt):
    """The step counter of the first projected matrix (an int, or a 0-d device tensor under capturable)."""
    for state in opt.state.values():
        if "proj_left" in state or "proj_right" in state:
            return int(state["step"])
    return None


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class _CudagraphSkips(logging.Handler):
    """Within ``with``: the messages of inductor's "skipping cudagraphs due to ..." (an artifact log,
    off by default), collected instead of printed."""

    LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:300])

    def __enter__(self):
        log = logging.getLogger(self.LOGGER)
        self._saved = (log.disabled, log.level, log.propagate)
        log.disabled, log.propagate = False, False
        log.setLevel(logging.WARNING)
        log.addHandler(self)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger(self.LOGGER)
        log.removeHandler(self)
        log.disabled, _, log.propagate = self._saved
        log.setLevel(self._saved[1])
        return False


def capturable_variant(make, device, steps: int, compile_mode: str | None = None) -> dict:
    """Median steady ``step()`` of a fresh optimizer: ``CAPTURABLE_WARMUP`` eager steps (the first one
    a refresh), then — ``compile_mode`` set ("default" or "reduce-overhead") — ``torch.compile(opt.step,
    fullgraph=True)`` called ``COMPILED_WARMUP`` times untimed (``compile_s``), then ``steps`` timed steps.
    Every step is counted against T: they must all fall before the next refresh."""
    import torch._dynamo
    from torch._dynamo.utils import counters, guard_failures

    taken = CAPTURABLE_WARMUP + (COMPILED_WARMUP if compile_mode else 0) + steps
    if taken >= GAP:
        raise ValueError(f"{taken} steps would reach the refresh at step {GAP}")
    torch._dynamo.reset()  # this variant's compilations and counters only
    counters.clear()
    opt = make()
    sync(device)
    start = time.perf_counter()
    for _ in range(CAPTURABLE_WARMUP):
        opt.step()
    sync(device)
    row = {"warmup_s": time.perf_counter() - start}
    step = opt.step
    if compile_mode is not None:
        step = torch.compile(opt.step, fullgraph=True, mode=None if compile_mode == "default" else compile_mode)
        skipped = _CudagraphSkips() if compile_mode == "reduce-overhead" else contextlib.nullcontext()
        start = time.perf_counter()
        with skipped:
            for _ in range(COMPILED_WARMUP):
                step()
            sync(device)
        row["compile_s"] = time.perf_counter() - start
        if compile_mode == "reduce-overhead":
            row["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
            row["cudagraph_skip_reasons"] = skipped.messages[:3]
            row["cudagraphs_used"] = row["cudagraph_skips"] == 0
    probe, graphs = _projection_probe(opt), _dynamo_graphs()
    row["steady_s"] = median_time(step, device, steps)
    row["timed_steps"] = steps
    row["steady_verified"] = probe is None or torch.equal(probe, _projection_probe(opt))
    row["step_count_after"] = _step_count(opt)
    row["graphs_compiled"] = _dynamo_graphs()
    row["graphs_compiled_while_timed"] = row["graphs_compiled"] - graphs  # > 0: a recompilation was timed
    if compile_mode is not None:
        row["recompiles"] = max(row["graphs_compiled"] - 1, 0)  # fullgraph: one graph per compilation
        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
        reasons = [r for rs in guard_failures.values() for r in rs]
        row["recompile_reasons"] = [r.split("\n")[0][:300] for r in reasons[:3]]
    del opt, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def capturable_variants(named, rank: int) -> list[tuple]:
    """(name, make, how) of the capturable section's variants on ``named`` (``weights()``): ``how`` None
    (eager), "engine" (``compile=True``: compiled inside the step), or the ``torch.compile`` mode of
    ``opt.step``. Each ``make`` builds its optimizer on fresh copies of the weights and gradients: a
    ``torch.compile(opt.step)`` marks the parameters it saw as static inputs for good (a later
    ``compile=True`` would guard on each one's identity and hit the recompile limit), and every
    variant starts from the same weights."""

    def fresh():
        copies = []
        for _, p, projected in named:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            copies.append((q, projected))
        return copies

    def groups():
        params = fresh()
        return [dict(params=[q for q, pr in params if pr], rank=rank, update_proj_gap=GAP),
                dict(params=[q for q, pr in params if not pr])]

    capture = dict(capturable=True, nonfinite="skip")
    variants = [("adamw_fused", lambda: torch.optim.AdamW([q for q, _ in fresh()], lr=1e-3, fused=True), None),
                ("adamw_foreach", lambda: torch.optim.AdamW([q for q, _ in fresh()], lr=1e-3, foreach=True), None)]
    for method, preset in (("fira", fullrank.Fira), ("galore", fullrank.GaLore)):
        variants += [
            (method, lambda preset=preset: preset(groups(), lr=1e-3), None),
            (f"{method}_capturable", lambda preset=preset: preset(groups(), lr=1e-3, **capture), None),
            (f"{method}_compiled_step", lambda preset=preset: preset(groups(), lr=1e-3, **capture), "default"),
            (f"{method}_capturable_compile", lambda preset=preset: preset(groups(), lr=1e-3, compile=True, **capture),
             "engine"),
            (f"{method}_compiled_step_cudagraphs", lambda preset=preset: preset(groups(), lr=1e-3, **capture),
             "reduce-overhead"),
        ]
    return variants


def capturable_steps(device, shape, steps: int, budget_s: float) -> dict:
    """Steady ``step()`` at LLaMA-130M shapes (every weight: the projected matrices in one group at
    rank 256, T = 200, α = 0.25, the rest plain), bf16 and fp32 parameters with fixed random gradients:
    torch AdamW fused (the baseline) and foreach; our Fira and GaLore eager, ``capturable=True``,
    ``capturable=True, compile=True``, and ``torch.compile(opt.step, fullgraph=True)`` of a capturable
    optimizer (on CUDA also ``mode="reduce-overhead"``, CUDA graphs). A variant that fails records its
    error; compiled variants not started within ``budget_s`` of the section's start are skipped (the
    eager ones always run). Goal: a Fira steady step ≤ 1.0× AdamW fused in bf16."""
    started = time.perf_counter()
    out = {"shape": dict(hidden=shape[0], intermediate=shape[1], layers=shape[2], rank=shape[3], update_proj_gap=GAP,
                         scale=0.25), "timed_steps": steps, "budget_s": budget_s, "dtypes": {}}
    for dtype_name, dtype in CAPTURABLE_DTYPES:
        variants = capturable_variants(weights(shape, device, dtype), shape[3])
        rows = {}
        for name, make, how in variants:
            if how == "reduce-overhead" and device.type != "cuda":
                rows[name] = {"skipped": "CUDA graphs need a CUDA device"}
                continue
            if how is not None and time.perf_counter() - started > budget_s:
                rows[name] = {"skipped": f"compile budget of {budget_s:.0f} s spent (--capturable-budget)"}
                continue
            try:
                rows[name] = capturable_variant(make, device, steps, None if how in (None, "engine") else how)
            except Exception as err:  # one variant's failure must not lose the others
                rows[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        base_name = "adamw_fused" if "steady_s" in rows.get("adamw_fused", {}) else "adamw_foreach"
        base = rows.get(base_name, {}).get("steady_s")
        for name, row in rows.items():
            if "steady_s" in row and base:
                row["vs_adamw_fused"] = row["steady_s"] / base
            if "steady_s" in row:
                extra = f" ({row['vs_adamw_fused']:.2f}× {base_name})" if base else ""
                if "compile_s" in row:
                    extra += f"  compile {row['compile_s']:6.1f} s, {row['recompiles']} recompile(s), " \
                             f"{row['graph_breaks']} graph break(s)"
                if "cudagraphs_used" in row:
                    extra += "  CUDA graphs used" if row["cudagraphs_used"] else \
                        f"  CUDA graphs SKIPPED: {(row['cudagraph_skip_reasons'] or ['(no reason logged)'])[0][:120]}"
                if name.endswith("_capturable_compile"):
                    extra += f"  warm-up with compile {row['warmup_s']:6.1f} s"
                if not row["steady_verified"] or row["graphs_compiled_while_timed"]:
                    extra += "  [NOT STEADY: a refresh or a recompilation was timed]"
                print(f"  capturable {dtype_name} {name:34s} steady {row['steady_s'] * 1e3:8.2f} ms{extra}", flush=True)
            else:
                print(f"  capturable {dtype_name} {name:34s} {next(iter(row.items()))[0]}: "
                      f"{next(iter(row.values())).splitlines()[0][:200]}", flush=True)
        out["dtypes"][dtype_name] = {"baseline": base_name, "variants": rows}
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fira = {name: row["vs_adamw_fused"] for name, row in out["dtypes"]["bf16"]["variants"].items()
            if name.startswith("fira") and "vs_adamw_fused" in row and row["steady_verified"]
            and not row["graphs_compiled_while_timed"]}
    if fira:
        best = min(fira, key=fira.get)
        measured = device.type == "cuda" and tuple(shape) == SHAPES["llama_130m"]
        out["goal"] = dict(target=CAPTURABLE_GOAL, best_fira_variant=best, measured=fira[best],
                           baseline=out["dtypes"]["bf16"]["baseline"], met=fira[best] <= CAPTURABLE_GOAL,
                           at_goal_conditions=measured)
        print(f"  goal: a Fira steady step ≤ {CAPTURABLE_GOAL:.1f}× AdamW fused in bf16: best {best} at "
              f"{fira[best]:.2f}× {out['goal']['baseline']} — {'met' if out['goal']['met'] else 'NOT met'}"
              f"{'' if measured else ' (dry run: not LLaMA-130M shapes on CUDA, says nothing about the goal)'}",
              flush=True)
    out["wall_s"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------- 8. torchtitan (fullrank.titan)
TITAN_STEPS = 20
TITAN_SAVED_AT = 10  # the Fira run saves here (and at its last step); a third run resumes from it
TITAN_QUICK = dict(steps=3, saved_at=2, batch=2, seq_len=64)  # the CPU dry run
TITAN_VOCAB = 32128  # the T5 tokenizer's 32,100 ids, rounded up to a multiple of 128
TITAN_DATASET = "fullrank_enwiki"
TITAN_STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)\s+memory:\s*([\d.]+)GiB"
                             r".*?tps:\s*([\d,]+)")


def titan_data_dir() -> Path | None:
    """The corpus and the T5 tokenizer: $FULLRANK_DATA, else ../shared/data, else .data (as gpu_session.sh)."""
    root = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("FULLRANK_DATA"), root.parent / "shared" / "data", root / ".data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "enwiki-2015-train.jsonl.gz").is_file() and \
                (Path(candidate) / "t5-base" / "tokenizer.json").is_file():
            return Path(candidate).resolve()
    return None


def _titan_debugmodel_t5(config):
    """A torchtitan debug-model config on the offline corpus: the T5 tokenizer (its vocabulary, 32,128
    rows, replaces the test tokenizer's 2,048) and the enwiki training split, streamed."""
    from datasets import load_dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader
    from torchtitan.models.common.config_utils import decoder_vocab_size

    data = titan_data_dir()
    if data is None:
        raise FileNotFoundError("no corpus: set FULLRANK_DATA to a folder with enwiki-2015-train.jsonl.gz and t5-base/")
    DATASETS[TITAN_DATASET] = DatasetConfig(
        path=str(data / "enwiki-2015-train.jsonl.gz"),
        loader=lambda path: load_dataset("json", data_files=path, split="train", streaming=True),
        sample_processor=lambda sample: sample["text"])
    model = config.model_spec.model
    model.vocab_size = TITAN_VOCAB
    model.tok_embeddings.num_embeddings = TITAN_VOCAB
    model.lm_head.out_features = TITAN_VOCAB
    config.loss.loss_fn.global_vocab_size = decoder_vocab_size(config.model_spec)
    config.hf_assets_path = str(data / "t5-base")
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset=TITAN_DATASET)
    config.validator.enable = False
    return config


def titan_debugmodel_adamw_t5():
    """``--module gpu_check --config titan_debugmodel_adamw_t5``: torchtitan's llama3_debugmodel (its
    AdamW, lr 8e-4) on the offline corpus."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel
    return _titan_debugmodel_t5(llama3_debugmodel())


def titan_debugmodel_fira_t5():
    """``--module gpu_check --config titan_debugmodel_fira_t5``: fullrank.titan's llama3_debugmodel_fira
    (Fira rank 64, lr 0.01, T = 200, α = 0.25, γ = 1.01) on the offline corpus."""
    from fullrank.titan.config_registry import llama3_debugmodel_fira
    return _titan_debugmodel_t5(llama3_debugmodel_fira())


def titan_cpu_loop(argv: list[str]) -> None:
    """What torchtitan's Trainer does in a step, with its components, on the CPU (its Trainer needs a
    GPU): the config parsed by its ConfigManager from ``argv``; the model built on the meta device,
    sharded by its FSDP2 function (one gloo rank), materialised and initialised; its loss, optimizer
    container, LR schedulers, tokenizer, dataloader and checkpoint manager from the config. FlexAttention
    has no backward on a CPU: the blocks use its causal SDPA instead. Prints its step lines."""
    import resource
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.components.loss import IGNORE_INDEX, ChunkedLossWrapper
    from torchtitan.config import TORCH_DTYPE_MAP, ConfigManager
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
    from torchtitan.models.common.attention import ScaledDotProductAttention

    config = ConfigManager().parse_args(argv)
    for layer in config.model_spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    init = Path(tempfile.mkdtemp()) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        torch.manual_seed(config.debug.seed or 0)
        with torch.device("meta"):
            model = config.model_spec.model.build()
        apply_fsdp_to_decoder(model, init_device_mesh("cpu", (1,)), pp_enabled=False,
                              param_dtype=TORCH_DTYPE_MAP[config.training.mixed_precision_param],
                              reduce_dtype=TORCH_DTYPE_MAP[config.training.mixed_precision_reduce])
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        loss_fn = config.loss.build(compile_config=config.compile)
        if isinstance(loss_fn, ChunkedLossWrapper):
            loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True
        optimizers = config.optimizer.build(model_parts=[model])
        schedulers = config.lr_scheduler.build(optimizers=optimizers, training_steps=config.training.steps)
        tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
        dataloader = config.dataloader.build(dp_world_size=1, dp_rank=0, tokenizer=tokenizer,
                                             seq_len=config.training.seq_len,
                                             local_batch_size=config.training.local_batch_size,
                                             snapshot_every_n_steps=config.checkpoint.interval)
        train_state = _TitanTrainState()
        checkpointer = config.checkpoint.build(
            dataloader=dataloader, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
            states={"train_state": train_state}, sd_adapter=None, base_folder=config.dump_folder)
        checkpointer.load(step=config.checkpoint.load_step)
        print(f"optimizers: {[type(o).__name__ for o in optimizers]}, starting at step {train_state.step + 1}",
              flush=True)
        batches = iter(dataloader)
        while train_state.step < config.training.steps:
            train_state.step += 1
            started = time.perf_counter()
            optimizers.zero_grad()
            inputs, labels = next(batches)
            extra = {key: value for key, value in inputs.items() if key != "input"}  # positions (RoPE)
            valid = (labels != IGNORE_INDEX).sum()
            pred = model(inputs["input"], **extra)
            loss, _ = loss_fn(pred, labels, valid, **{k: v for k, v in extra.items() if k == "positions"})
            loss.backward()
            grad_norm = dist_utils.clip_grad_norm_(list(model.parameters()), config.training.max_norm, foreach=True)
            optimizers.step()
            schedulers.step()
            seconds = time.perf_counter() - started
            rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"step: {train_state.step:2}  loss: {float(loss.detach()):8.5f}  grad_norm: {float(grad_norm):7.4f}  "
                  f"memory: {rss_gib:5.2f}GiB(host peak RSS)  tps: {round(labels.numel() / seconds):,}", flush=True)
            checkpointer.save(train_state.step, last_step=train_state.step == config.training.steps)
        checkpointer.close()
    finally:
        dist.destroy_process_group()


class _TitanTrainState:
    """The Trainer's own checkpointed state (its step), for the CPU loop."""

    step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])


def _titan_launch(name: str, args: list[str], device, out_dir: Path, timeout_s: int) -> dict:
    """One run: ``torchrun -m torchtitan.train`` (NCCL, one rank) on CUDA, else :func:`titan_cpu_loop`
    in its own process; the step lines parsed (loss, tokens/s, peak memory per step)."""
    import subprocess
    bench = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bench), str(bench.parent / "src"), *sys.path]),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if device.type == "cuda":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "torchtitan.train", *args]
    else:
        cmd = [sys.executable, "-c", "import sys, gpu_check; gpu_check.titan_cpu_loop(sys.argv[1:])", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(out_dir))
    log = proc.stdout + proc.stderr
    (out_dir / f"titan_{name}.log").write_text(log)
    steps = {}
    for line in log.splitlines():
        match = TITAN_STEP_LINE.search(line)
        if match:
            step, loss, grad_norm, memory, tps = match.groups()
            steps[int(step)] = dict(loss=float(loss), grad_norm=float(grad_norm), memory_gib=float(memory),
                                    tps=int(tps.replace(",", "")))
    if proc.returncode != 0 or not steps:
        raise RuntimeError(f"{name}: exit {proc.returncode}, {len(steps)} step lines; log tail:\n{log[-3000:]}")
    timed = [row["tps"] for step, row in sorted(steps.items()) if step > min(steps)] or [steps[min(steps)]["tps"]]
    row = dict(command=" ".join(cmd[cmd.index("--module"):]), wall_s=time.perf_counter() - started,
               first_step=min(steps), last_step=max(steps), losses=[steps[s]["loss"] for s in sorted(steps)],
               final_loss=steps[max(steps)]["loss"], tps_median=statistics.median(timed),
               peak_memory_gib=max(r["memory_gib"] for r in steps.values()))
    print(f"  titan {name:14s} steps {row['first_step']}–{row['last_step']}: loss {row['losses'][0]:.4f} → "
          f"{row['final_loss']:.4f}, {row['tps_median']:,.0f} tokens/s (median after the first step), "
          f"peak memory {row['peak_memory_gib']:.2f} GiB, {row['wall_s']:.0f} s", flush=True)
    return row


def titan_trainer(device, quick: bool, out_dir: Path) -> dict:
    """torchtitan's trainer with fullrank's Fira (``--module fullrank.titan``'s debug-model config) beside
    torchtitan's own AdamW, on the offline corpus: ``TITAN_STEPS`` steps each, torchrun with NCCL on one
    GPU; the Fira run checkpoints at ``TITAN_SAVED_AT`` (fullrank's state through DCP) and a third run
    resumes from there to the end (its losses against the uninterrupted run's). Recorded: loss, tokens/s
    and peak reserved memory per step (torchtitan's metrics). On a CPU (``--quick``) the same configs run
    through torchtitan's components in a CPU loop at toy sizes; the launch is skipped (no CUDA)."""
    if importlib.util.find_spec("torchtitan") is None:
        return {"skipped": 'torchtitan is not installed (pip install "fullrank[titan]")'}
    if titan_data_dir() is None:
        return {"skipped": "no corpus: set FULLRANK_DATA to a folder with enwiki-2015-train.jsonl.gz and t5-base/"}
    sizes = TITAN_QUICK if quick or device.type != "cuda" else dict(steps=TITAN_STEPS, saved_at=TITAN_SAVED_AT)
    work = (out_dir / ("titan_quick" if quick else "titan")).resolve()
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    common = ["--training.steps", str(sizes["steps"]), "--metrics.log_freq", "1", "--metrics.disable_color_printing"]
    if "batch" in sizes:
        common += ["--training.local_batch_size", str(sizes["batch"]), "--training.seq_len", str(sizes["seq_len"])]
    checkpoint = ["--checkpoint.enable", "--checkpoint.interval", str(sizes["saved_at"]),
                  "--checkpoint.keep_latest_k", "0"]
    saved = work / "fira" / "checkpoint" / f"step-{sizes['saved_at']}"
    runs = {
        "adamw": ["--module", "gpu_check", "--config", "titan_debugmodel_adamw_t5", *common,
                  "--dump_folder", str(work / "adamw")],
        "fira": ["--module", "gpu_check", "--config", "titan_debugmodel_fira_t5", *common, *checkpoint,
                 "--dump_folder", str(work / "fira")],
        "fira_resumed": ["--module", "gpu_check", "--config", "titan_debugmodel_fira_t5", *common, *checkpoint,
                         "--checkpoint.initial_load_path", str(saved),
                         "--checkpoint.no-initial-load-model-only", "--dump_folder", str(work / "fira_resumed")],
    }
    out = {"device": device.type, "launch": "torchrun -m torchtitan.train, NCCL, 1 rank" if device.type == "cuda"
           else "skipped: no CUDA (torchtitan's components in a CPU loop instead)", "runs": {}}
    for name, args in runs.items():
        out["runs"][name] = _titan_launch(name, args, device, work, timeout_s=300)
    adamw, fira, resumed = (out["runs"][k] for k in ("adamw", "fira", "fira_resumed"))
    out["fira_vs_adamw"] = dict(tps=fira["tps_median"] / adamw["tps_median"],
                                peak_memory=fira["peak_memory_gib"] / adamw["peak_memory_gib"])
    tail = fira["losses"][sizes["saved_at"]:]
    out["resume"] = dict(first_step=resumed["first_step"], expected_first_step=sizes["saved_at"] + 1,
                         max_abs_loss_difference=max(abs(a - b) for a, b in zip(resumed["losses"], tail)))
    dry = "" if device.type == "cuda" else " (CPU dry run: host RSS, toy sizes; the ratios say nothing about a GPU)"
    ratios = out["fira_vs_adamw"]
    print(f"  titan Fira/AdamW: {ratios['tps']:.2f}× tokens/s, {ratios['peak_memory']:.2f}× peak memory; "
          f"resumed from step {sizes['saved_at']}: starts at step {resumed['first_step']}, losses within "
          f"{out['resume']['max_abs_loss_difference']:.2e} of the uninterrupted run{dry}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="toy sizes (a CPU dry run of every section)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="end-to-end micro-batch (sequences of 256 tokens)")
    parser.add_argument("--capturable-budget", type=float, default=90.0,
                        help="seconds after which the capturable section starts no more compiled variants")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("ops", "step", "refresh", "memory", "e2e", "fsdp", "trace", "capturable", "titan"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu --quick for a dry run)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the optimizer comparisons
    started = time.perf_counter()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    official = official_modules()
    result = {"benchmark": "gpu_check", "command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]),
              "machine": tm.machine_info(device), "official_packages": {k: tm.package_version(k.replace("_", "-"))
                                                                        for k in ("galore_torch", "fira", "apollo_torch")},
              "targets": TARGETS}
    sections = [("ops", lambda: op_counts(device, [2] if args.quick else [2, 6, 12])),
                ("step", lambda: {name: step_times(device, name, shape,
                                                   3 if args.quick else (args.steps if name == "llama_130m" else 10),
                                                   official, torch.float32, 2 if name == "llama_130m" else 1)
                                  for name, shape in shapes.items()}),
                ("refresh", lambda: refresh_times(device, shapes["llama_130m"], 2 if args.quick else 5)),
                ("memory", lambda: transient_memory(device, args.quick)),
                ("e2e", lambda: end_to_end(device, args.quick, 3 if args.quick else 10, 2 if args.quick else args.batch)),
                ("fsdp", lambda: fsdp_one_device(device, args.quick, out_dir)),
                ("trace", lambda: memory_trace_check(device, args.quick)),
                ("capturable", lambda: capturable_steps(device, CAPTURABLE_QUICK_SHAPE if args.quick else SHAPES["llama_130m"],
                                                        3 if args.quick else 10,
                                                        float("inf") if args.quick else args.capturable_budget)),
                ("titan", lambda: titan_trainer(device, args.quick, out_dir))]
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else tm.RESULTS_DIR
    if args.quick and not os.environ.get("OUT"):
        out_dir = Path("/tmp")  # a dry run is not a result
    out_path = out_dir / ("gpu_check_quick.json" if args.quick else "gpu_check.json")
    for name, run in sections:
        if name in args.skip:
            continue
        print(f"[{name}] at {time.perf_counter() - started:.0f} s", flush=True)
        try:
            result[name] = run()
        except Exception as err:  # one failing section must not lose the others' numbers
            result[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {name} failed: {type(err).__name__}: {err}", flush=True)
        out_path.write_text(json.dumps(result, indent=1))
    checks = {}
    if isinstance(result.get("step"), dict) and "llama_130m" in result["step"]:
        checks["fira_amortised_vs_adamw_foreach_130m"] = result["step"]["llama_130m"]["fira"]["amortised_vs_adamw_foreach"]
    if isinstance(result.get("refresh"), dict) and "warm1_batched_s" in result["refresh"]:
        checks["refresh_84_matrices_s"] = min(result["refresh"][k] for k in ("exact_batched_s", "randomized_batched_s",
                                                                             "warm1_batched_s"))
    if isinstance(result.get("e2e"), dict) and "methods" in result["e2e"]:
        checks["fira_throughput_vs_adamw_350m"] = result["e2e"]["methods"]["fira"]["throughput_vs_adamw"]
    if isinstance(result.get("ops"), list):
        checks["ops_vs_adamw"] = max(r["ratio"] for r in result["ops"] if r["method"] in ("fira", "galore"))
    if isinstance(result.get("trace"), dict) and "max_abs_error" in result["trace"]:
        checks["memory_trace_max_abs_error"] = result["trace"]["max_abs_error"]
    if isinstance(result.get("capturable"), dict) and "goal" in result["capturable"]:
        checks["fira_steady_vs_adamw_fused_bf16_130m"] = result["capturable"]["goal"]["measured"]
    result["checks"] = {k: {"measured": v, "target": TARGETS[k],
                            "met": v >= TARGETS[k] if k == "fira_throughput_vs_adamw_350m" else v <= TARGETS[k]}
                        for k, v in checks.items()}
    result["wall_s"] = time.perf_counter() - started
    out_path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["checks"], indent=1))
    print(f"wrote {out_path} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
