"""Count the top-level ``aten::`` operators of one steady optimizer step.

Every op a step dispatches from Python is a kernel launch on a GPU (views excepted), so this count
is what makes a step launch-bound. A *top-level* op is an ``aten::`` event of ``torch.profiler``
with no ``aten::`` ancestor (the ops that ``_foreach_*`` or ``linalg_svd`` run inside themselves are
not counted). Counted on the CPU at LLaMA-130M shapes (hidden 768, intermediate 2048, vocab 32,000)
with 2, 6 and 12 layers; every method's projected weights are one group at rank 256, the rest a
plain group; the step counted is the second (the first computes the subspaces).

    PYTHONPATH=src python bench/op_count.py                       # writes bench/results/op_count.json
    PYTHONPATH=src python bench/op_count.py --baseline-ref 573c892   # also counts engine v1 (git ref)

Target: the count of a steady Fira step does not grow with depth and is ≤ 3× torch AdamW (foreach)'s.
The count is of the device-generic path, the one a GPU runs; ``--cpu-path`` counts the CPU's, whose
column norms over rows go through 64-row blocks (``base/norms.CPU_ROW_BLOCK``: more ops, faster there).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402

METHODS = ("adamw_foreach", "adamw_fused", "galore", "fira", "apollo", "adarankgrad", "fira_adaptive")
TARGET_RATIO = 3.0


def top_level_ops(step) -> dict[str, int]:
    """{op name: count} of the top-level ``aten::`` ops run by ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def build(package, method: str, layers: int, device: torch.device, rank: int = 256, dtype=torch.float32):
    """(optimizer, params) for ``method`` over LLaMA-130M shapes with fixed random gradients."""
    gen = torch.Generator().manual_seed(0)
    named = []
    for name, shape, projected in tm.llama_weight_shapes(layers):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        named.append((name, p, projected))
    if method.startswith("adamw"):
        fused = method == "adamw_fused"
        return torch.optim.AdamW([p for _, p, _ in named], lr=1e-3, foreach=not fused, fused=fused or None)
    groups = [dict(params=[p for _, p, pr in named if pr], param_names=[n for n, _, pr in named if pr], rank=rank,
                   update_proj_gap=200),
              dict(params=[p for _, p, pr in named if not pr], param_names=[n for n, _, pr in named if not pr])]
    options = {}
    if device.type == "cpu":  # the GPU configuration, counted on the CPU: stacked buckets (the plain groups'
        declared = package.SubspaceAdamW.option_table() if hasattr(package.SubspaceAdamW, "option_table") else {}
        # kernels are each engine's default: torch's fused AdamW)
        if "bucket_cap_mb" in declared or "bucket_cap_mb" in inspect.signature(package.SubspaceAdamW).parameters:
            options["bucket_cap_mb"] = 256
    return package.make_optimizer(method, groups, lr=1e-3, **options)


def count_steady(package, method: str, layers: int, device: torch.device = torch.device("cpu")) -> int:
    """Top-level ops of the second step of ``method`` (``package.make_optimizer`` name, or adamw_foreach/_fused)."""
    opt = build(package, method, layers, device)
    opt.step()  # the subspaces are computed here
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(top_level_ops(opt.step).values())


def device_generic_norms(package) -> None:
    """Count the device-generic column norms (as on a GPU) in ``package``: its CPU row blocking off,
    wherever its version keeps the switch (``optim/base/norms.py``; ``optim/residual.py`` before)."""
    import importlib

    for module in ("optim.base.norms", "optim.residual"):
        try:
            found = importlib.import_module(f"{package.__name__}.{module}")
        except ImportError:
            continue
        if hasattr(found, "CPU_ROW_BLOCK"):
            found.CPU_ROW_BLOCK = 0
            return
    raise RuntimeError(f"{package.__name__}: no CPU_ROW_BLOCK switch found to count the device-generic path")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6, 12])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--baseline-ref", default=None, help="also count the engine at this git ref")
    parser.add_argument("--cpu-path", action="store_true",
                        help="count the CPU's own path (Fira's column norms over rows summed in 64-row blocks: more "
                             "ops, no more per matrix); default: the device-generic path a GPU runs")
    parser.add_argument("--out", default=str(tm.RESULTS_DIR / "op_count.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import fullrank

    engines = {"v2": fullrank}
    if args.baseline_ref:
        engines[f"baseline@{args.baseline_ref}"] = tm.load_baseline(args.baseline_ref)
    if not args.cpu_path:
        for package in engines.values():
            device_generic_norms(package)
    rows = []
    for layers in args.layers:
        adamw = count_steady(fullrank, "adamw_foreach", layers)
        for engine, package in engines.items():
            for method in args.methods:
                if method.startswith("adamw") and engine != "v2":  # (torch's: counted once)
                    continue
                ops = adamw if method == "adamw_foreach" else count_steady(package, method, layers)
                rows.append(dict(engine=engine, method=method, layers=layers, matrices=7 * layers, ops=ops,
                                 ratio_to_adamw=ops / adamw))
                print(f"{engine:>22} {method:>15} layers={layers:>2}  ops={ops:>5}  × AdamW {ops / adamw:5.2f}", flush=True)
    v2 = [r for r in rows if r["engine"] == "v2" and not r["method"].startswith("adamw")]
    verdict = {m: dict(max_ratio=max(r["ratio_to_adamw"] for r in v2 if r["method"] == m),
                       grows_with_depth=len({r["ops"] for r in v2 if r["method"] == m}) > 1)
               for m in {r["method"] for r in v2}}
    out = dict(machine=tm.machine_info(torch.device("cpu")), target_ratio=TARGET_RATIO,
               path="cpu (64-row blocked column norms)" if args.cpu_path else "device-generic (as on a GPU)",
               rows=rows, verdict=verdict)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
