"""FSDP2: communication volume, optimizer step time and state bytes per process at LLaMA-130M shapes.

Each process holds the model's weights as FSDP2 shards (``fully_shard`` per layer, gloo on CPU or
nccl on GPUs), with fixed random gradients (the values do not change the arithmetic). Per method:

* the steady ``optimizer.step()`` (median of ``--steps``, no refresh) and one refresh step, per process;
* the elements each process's collectives moved in them (``fullrank.optim.base.shards.CommLog``), beside
  what the table of ``sharding.py`` predicts and beside FSDP's own traffic per step (all-gather in
  forward and backward, reduce-scatter of the gradients: 3·N·(w−1)/w elements per process);
* the optimizer state bytes per process;
* then the same optimizer on the unsharded weights in one process (the others wait), for the ratio.

    PYTHONPATH=src python bench/fsdp.py                      # 2 CPU processes, 1 thread each
    PYTHONPATH=src python bench/fsdp.py --device cuda --processes 1   # one GPU (FSDP on a mesh of 1)
    torchrun --nproc_per_node 8 bench/fsdp.py --device cuda  # a multi-GPU machine

Writes ``bench/results/fsdp[_<device>].json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402

import fullrank  # noqa: E402
from fullrank.memory import optimizer_state_bytes  # noqa: E402
from fullrank.optim.base.shards import CommLog, local  # noqa: E402

METHODS = ("adamw", "fira", "galore", "apollo")


class Holder(nn.Module):
    """Weights of one decoder layer (or the embeddings/head), as parameters with dotted names."""

    def __init__(self, weights: list[tuple[str, tuple, bool]], gen: torch.Generator, device, dtype):
        super().__init__()
        self.names = []
        for name, shape, _ in weights:
            safe = name.replace(".", "_")
            self.register_parameter(safe, nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype)))
            self.names.append((safe, name))


def build(layers: int, device, dtype, shard: bool):
    gen = torch.Generator().manual_seed(0)
    shapes = tm.llama_weight_shapes(layers)
    projected = {name for name, _, p in shapes if p}
    per_layer = [[s for s in shapes if s[0].startswith(f"model.layers.{i}.")] for i in range(layers)]
    rest = [s for s in shapes if not s[0].startswith("model.layers.")]
    model = nn.Module()
    model.layers = nn.ModuleList(Holder(w, gen, device, dtype) for w in per_layer)
    model.rest = Holder(rest, gen, device, dtype)
    if shard:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    grads = torch.Generator().manual_seed(1)
    named = []
    for holder in [*model.layers, model.rest]:
        for safe, name in holder.names:
            p = getattr(holder, safe)
            whole = (torch.randn(p.shape, generator=grads) * 1e-3).to(device, dtype)
            if shard:
                from torch.distributed.tensor import DTensor
                rows = local(p).shape[0]
                start = math.ceil(p.shape[0] / dist.get_world_size()) * dist.get_rank()
                p.grad = DTensor.from_local(whole[start:start + rows].contiguous(), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            else:
                p.grad = whole
            named.append((name, p, name in projected))
    return model, named


def make(method: str, named, rank: int, gap: int, bucket_cap_mb=None):
    proj = [(n, p) for n, p, is_proj in named if is_proj]
    plain = [(n, p) for n, p, is_proj in named if not is_proj]
    groups = [{"params": [p for _, p in proj], "param_names": [n for n, _ in proj], "rank": rank,
               "update_proj_gap": gap, "scale": 0.25},
              {"params": [p for _, p in plain], "param_names": [n for n, _ in plain]}]
    options = {} if bucket_cap_mb is None or method == "adamw" else {"bucket_cap_mb": bucket_cap_mb}
    return fullrank.make_optimizer(method, groups, lr=1e-3, **options)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method: str, named, args, device) -> dict:
    opt = make(method, named, args.rank, args.gap, args.bucket_cap_mb)
    sync(device)
    t = time.perf_counter()
    opt.step()  # the first refresh (state allocated)
    sync(device)
    first = time.perf_counter() - t
    times, steady_log = [], CommLog()
    for k in range(args.steps):
        with steady_log.recording() if k == 0 else contextlib.nullcontext():
            sync(device)
            t = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
    refresh = None
    refresh_log = CommLog()
    if method != "adamw":
        for _ in range(args.gap - 1 - args.steps):
            opt.step()
        with refresh_log.recording():
            sync(device)
            t = time.perf_counter()
            opt.step()
            sync(device)
            refresh = time.perf_counter() - t
    return {"steady_s": statistics.median(times), "steady_all_s": times, "refresh_s": refresh, "first_step_s": first,
            "steady_elements": steady_log.elements, "steady_calls": steady_log.calls, "steady_comm_s": steady_log.seconds,
            "refresh_elements": refresh_log.elements, "refresh_calls": refresh_log.calls, "refresh_comm_s": refresh_log.seconds,
            "state_bytes": optimizer_state_bytes(opt)}


def predicted(shapes, rank: int, world: int) -> dict:
    """The table of sharding.py for these (name, shape, projected) weights: elements per process per
    steady step and per refresh."""
    steady = refresh = 0
    for _, (m, n), is_proj in ((name, shape, p) for name, shape, p in shapes if len(shape) == 2):
        if not is_proj:
            continue
        chunk = math.ceil(n / world)
        if m < n:  # left projection: reduce-scatter r·n (+ n column norms), all-gather (r+1)·n
            steady += (rank + 1) * chunk * world * 2
            refresh += math.ceil(m / world) * n + m * rank
        else:
            refresh += math.ceil(m / world) * n + rank * n
    return {"steady": steady, "refresh": refresh}


def worker(args) -> None:
    world, me = dist.get_world_size(), dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', me))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, named = build(args.layers, device, dtype, shard=True)
    total_params = sum(p.numel() for _, p, _ in named)
    results = {"sharded": {}, "unsharded": {}}
    for method in args.methods:
        results["sharded"][method] = measure(method, named, args, device)
        dist.barrier()
    del model, named
    if me == 0:  # the same optimizers on whole weights, one process (the others wait in a barrier)
        _, whole = build(args.layers, device, dtype, shard=False)
        for method in args.methods:
            results["unsharded"][method] = measure(method, whole, args, device)
        del whole
    gathered = [None] * world
    dist.all_gather_object(gathered, results["sharded"])
    if me == 0:
        report(args, device, total_params, gathered, results["unsharded"])
    dist.barrier()  # (a process leaving while another still talks to it aborts in gloo)


def report(args, device, total_params, gathered, unsharded) -> None:
    world = len(gathered)
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    pred = predicted(tm.llama_weight_shapes(args.layers), args.rank, world)
    out = {"command": "python bench/fsdp.py " + " ".join(sys.argv[1:]), "bucket_cap_mb": args.bucket_cap_mb,
           "machine": tm.machine_info(device), "git": tm.git_info(), "world": world, "rank": args.rank, "gap": args.gap,
           "layers": args.layers, "dtype": args.dtype, "threads_per_process": args.threads,
           "load_average": os.getloadavg(), "parameters": total_params,
           "fsdp_elements_per_step": 3 * total_params * (world - 1) / world,
           "predicted_elements": pred, "per_process": gathered, "unsharded": unsharded,
           "element_bytes": elem}
    target = Path(args.out or Path(__file__).parent / "results" / f"fsdp{'' if device.type == 'cpu' else '_' + device.type}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1))
    print(summary(out))
    print(f"wrote {target}")


def summary(out: dict) -> str:
    world, elem = out["world"], out["element_bytes"]
    lines = [f"LLaMA-{out['layers']}-layer shapes (hidden 768), rank {out['rank']}, {world} process(es), {out['dtype']}, "
             f"{out['threads_per_process']} thread(s) each; load average {out['load_average'][0]:.1f}",
             f"FSDP's own traffic per step and process: {out['fsdp_elements_per_step'] * elem / 2**20:.0f} MiB",
             "| method | step, sharded (per process) | of it in collectives | step, 1 process unsharded | ratio | "
             "refresh step sharded / unsharded | optimizer traffic per step | per refresh step | state per process / unsharded |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, sharded in out["per_process"][0].items():
        whole = out["unsharded"].get(method, {})
        slowest = max(p[method]["steady_s"] for p in out["per_process"])
        steady_mib = sum(sharded["steady_elements"].values()) * elem / 2**20
        refresh_mib = sum(sharded["refresh_elements"].values()) * elem / 2**20
        refresh = (f"{max(p[method]['refresh_s'] for p in out['per_process']):.2f} / {whole.get('refresh_s', 0):.2f} s"
                   if sharded["refresh_s"] is not None else "–")
        state = sum(p[method]["state_bytes"] for p in out["per_process"]) / world
        comm = max(sum(p[method]["steady_comm_s"].values()) for p in out["per_process"])
        lines.append(f"| {method} | {slowest * 1e3:.0f} ms | {comm * 1e3:.0f} ms | {whole.get('steady_s', float('nan')) * 1e3:.0f} ms | "
                     f"{slowest / whole.get('steady_s', float('nan')):.2f} | {refresh} | {steady_mib:.2f} MiB | "
                     f"{refresh_mib:.1f} MiB | {state / 2**20:.0f} / {whole.get('state_bytes', 0) / 2**20:.0f} MiB |")
    pred = out["predicted_elements"]
    lines.append(f"predicted by sharding.py's table (projected matrices): {pred['steady'] * elem / 2**20:.2f} MiB per step, "
                 f"{pred['refresh'] * elem / 2**20:.1f} MiB per refresh (+ the all-reduced scalars)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gap", type=int, default=8, help="T (steps between refreshes) of this benchmark")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bucket-cap-mb", type=float, default=None, help="the engine's bucket_cap_mb (default: its own)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if args.steps >= args.gap:
        parser.error(f"--steps must be below --gap ({args.gap}), got {args.steps}")
    if "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        try:
            worker(args)
        finally:
            dist.destroy_process_group()
        return
    import tempfile

    import torch.multiprocessing as mp
    init = Path(tempfile.mkdtemp()) / "init"
    mp.spawn(_spawned, args=(args, str(init)), nprocs=args.processes)


def _spawned(rank: int, args, init: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=args.processes)
    try:
        worker(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
