"""Shared helpers of the benchmarks: machine info, timing, LLaMA-130M shapes, state-byte counting.

Not part of the ``fullrank`` package: the scripts in ``bench/`` import it by path.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_IMG_DIR = Path(__file__).resolve().parents[1] / "docs" / "img"

# LLaMA-130M (GaLore/Fira's smallest model): hidden 768, intermediate 2048, 12 layers, 12 heads,
# vocab 32000, untied embeddings.
LLAMA_130M = dict(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000)


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    info.update(git_info())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def git_info() -> dict:
    """Commit of the checkout and whether the package sources differ from it (benchmarks time the tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        return {"git_commit": commit, "src_changes_vs_commit": [line.strip() for line in dirty if line.strip()]}
    except (OSError, subprocess.CalledProcessError):
        return {}


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def load_baseline(ref: str):
    """The ``fullrank`` package at git ``ref`` (e.g. the engine before a change), imported as
    ``fullrank_baseline`` beside the working tree's ``fullrank``, so both are timed in one process."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    target = Path(tempfile.mkdtemp(prefix="fullrank_baseline_"))
    archive = subprocess.run(["git", "archive", ref, "src/fullrank"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    package_dir = target / "src" / "fullrank"
    spec = importlib.util.spec_from_file_location("fullrank_baseline", package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fullrank_baseline"] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronised on CUDA before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summary(samples: list[float]) -> dict:
    """Median, quartiles, min and count of a list of seconds."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "min_s": s[0], "n": len(s)}


def amortised(steady_s: float, refresh_extra_s: float, gap: int) -> float:
    """Mean step time when one step in ``gap`` also recomputes the projection (costing ``refresh_extra_s`` more)."""
    return steady_s + refresh_extra_s / gap


def force_projection_refresh(optimizer: torch.optim.Optimizer, gap: int) -> int:
    """Move every projected state's step counter to the next multiple of ``gap``.

    The next ``step()`` then recomputes the projection, as it does once every ``gap`` steps in
    training. Works for ``fullrank`` (``proj_left``/``proj_right``, or ``proj_seed`` for a seeded random
    projection), for GaLore-style packages (``projector`` in state) and for pytorch-optimizer (its
    projectors count the group's ``step``); plain AdamW states are untouched. Returns how many states moved.
    """
    moved = 0
    for state in optimizer.state.values():
        step = state.get("step")
        if not isinstance(step, int) and not (isinstance(step, torch.Tensor) and step.dim() == 0):
            continue
        if not ({"proj_left", "proj_right", "proj_seed", "projector"} & state.keys()):
            continue
        if isinstance(step, torch.Tensor):  # capturable=True: a device counter, which the host re-reads
            step.fill_((int(step) // gap + 1) * gap)
            optimizer.forget_caches()
        else:
            state["step"] = (step // gap + 1) * gap
        moved += 1
    for group in optimizer.param_groups:  # pytorch-optimizer: one counter per group, incremented before use
        if group.get("rank") is not None and isinstance(group.get("step"), int) and any(
                "projector" in optimizer.state.get(p, {}) for p in group["params"]):
            group["step"] = ((group["step"] + 1) // gap + 1) * gap - 1
            moved += 1
    return moved


def time_refreshes(opts: dict, device, reps: int, gap: int, step=None) -> dict[str, dict]:
    """Time ``reps`` refresh steps of each optimizer, each paired with the steady step right after it.

    The refresh's extra cost is the median of the paired differences (refresh − the next step), so
    that load from other processes, which changes over minutes, cancels out of it.
    Returns {name: {"refresh": [s], "after": [s], "extra": [s]}}.
    """
    step = step or (lambda opt: opt.step())
    out = {name: {"refresh": [], "after": [], "extra": []} for name in opts}
    for _ in range(reps):
        for name, opt in opts.items():
            if not force_projection_refresh(opt, gap):
                raise RuntimeError(f"{name}: no projected state to refresh")
            r = time_call(lambda: step(opt), device)
            a = time_call(lambda: step(opt), device)
            out[name]["refresh"].append(r)
            out[name]["after"].append(a)
            out[name]["extra"].append(r - a)
    return out


# ---------------------------------------------------------------------------- shapes
def llama_weight_shapes(layers: int, hidden: int = 768, intermediate: int = 2048, vocab: int = 32000):
    """[(name, shape, projected)] of a LLaMA model's weights (nn.Linear weights are out×in)."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden), False)]
    for i in range(layers):
        pre = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{pre}.self_attn.{proj}.weight", (hidden, hidden), True))
        shapes.append((f"{pre}.mlp.gate_proj.weight", (intermediate, hidden), True))
        shapes.append((f"{pre}.mlp.up_proj.weight", (intermediate, hidden), True))
        shapes.append((f"{pre}.mlp.down_proj.weight", (hidden, intermediate), True))
        shapes.append((f"{pre}.input_layernorm.weight", (hidden,), False))
        shapes.append((f"{pre}.post_attention_layernorm.weight", (hidden,), False))
    shapes.append(("model.norm.weight", (hidden,), False))
    shapes.append(("lm_head.weight", (vocab, hidden), False))
    return shapes


# ---------------------------------------------------------------------------- state bytes
def _tensors_in(value, depth: int = 0):
    """Tensors held by a state value: tensors, lists/tuples/dicts of them, and the tensor attributes
    of objects kept in state (galore-torch / fira / apollo keep a projector object there)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 3:
        return
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for v in vars(value).values():
            yield from _tensors_in(v, depth + 1)


def state_bytes(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of every tensor reachable from the optimizer's state.

    ``storage``: each distinct storage counted once at its full size: what the state keeps alive
    (a slice ``Vh[:r]`` keeps all of ``Vh``). ``logical``: numel × element size of each tensor.
    """
    seen, storage, logical = set(), 0, 0
    for state in optimizer.state.values():
        for t in _tensors_in(state):
            logical += t.numel() * t.element_size()
            if not t.numel():
                continue
            key = (t.device, t.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            storage += t.untyped_storage().nbytes()
    return {"storage": storage, "logical": logical}


# ---------------------------------------------------------------------------- output
def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def finish(result: dict, out: Path, plot_path: Path, report, plot) -> None:
    """Record the load average at the end, write ``out``, print the report, draw the chart."""
    try:
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    write_json(out, result)
    report(result)
    try:
        plot(result, plot_path)
        print(f"\nwrote {out} and {plot_path}")
    except ImportError:
        print(f"\nwrote {out} (matplotlib not installed: no chart)")
