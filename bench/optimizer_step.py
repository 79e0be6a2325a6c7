"""Time ``optimizer.step()`` of torch AdamW, our GaLore and our Fira on LLaMA-130M weight shapes.

Every optimizer steps the same parameters with the same fixed random gradients (the values do not
change the arithmetic). The projected weights (q, k, v, o, gate, up, down of every layer) are one
GaLore-style group at ``--rank`` with T = ``--gap``; embeddings, lm_head and norms are a plain AdamW
group. Torch AdamW steps every tensor.

* steady step: median of ``--steps`` steps without a projection refresh, the optimizers taking
  turns round by round so that load from other processes hits them alike;
* refresh step: ``--refresh-reps`` steps that recompute the projection (SVD), each paired with
  the steady step right after it; the refresh's extra cost is the median paired difference;
* amortised = steady + extra / T, the mean step time over a training run.

Also: where the time goes (torch.profiler self time by op class: matmul, SVD/QR, the rest), the
floor of the projection matmuls alone, optimizer-state bytes (``fullrank.memory``), and exact vs
randomized SVD on a 2048×768 matrix at the same rank.

    PYTHONPATH=src python bench/optimizer_step.py --threads 2            # CPU, writes bench/results/optimizer_step.json
    PYTHONPATH=src python bench/optimizer_step.py --device cuda --dtype bfloat16
    PYTHONPATH=src python bench/optimizer_step.py --threads 2 --baseline-ref 573c892   # engine v1 beside v2
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402

import fullrank  # noqa: E402
from fullrank.memory import optimizer_state_bytes  # noqa: E402
from fullrank.optim.units.svd import exact_svd, randomized_svd  # noqa: E402

TARGETS = {
    "fira_vs_adamw": 1.15,              # target: Fira step ≤ 1.15× AdamW's (amortised, T = 200)
    "randomized_svd_speedup": 3.0,      # target: randomized SVD ≥ 3× faster than exact
}
ELSEWHERE = {"galore-torch": 1.36, "fira (official)": 2.80}  # step-time ratios vs AdamW measured elsewhere

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
              "aten::addbmm", "aten::_addmm_activation"}
NORM_OPS = {"aten::linalg_vector_norm", "aten::norm", "aten::_foreach_norm", "aten::isfinite", "aten::all"}
SVD_OPS_PREFIX = ("aten::linalg_svd", "aten::_linalg_svd", "aten::linalg_qr", "aten::linalg_householder_product",
                  "aten::geqrf", "aten::orgqr", "aten::_linalg_eigh", "aten::linalg_eigh")


# ---------------------------------------------------------------------------- setup
def build_params(layers: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    named = []
    for name, shape, projected in tm.llama_weight_shapes(layers):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        named.append((name, p, projected))
    return named


def make_optimizers(named, args) -> dict:
    proj = [(n, p) for n, p, pr in named if pr]
    plain = [(n, p) for n, p, pr in named if not pr]
    every = [p for _, p, _ in named]

    def groups():
        return [
            dict(params=[p for _, p in proj], param_names=[n for n, _ in proj], rank=args.rank,
                 update_proj_gap=args.gap, proj_type="std"),
            dict(params=[p for _, p in plain], param_names=[n for n, _ in plain]),
        ]

    common = dict(lr=1e-3, weight_decay=args.weight_decay)
    opts = {
        "adamw_foreach": torch.optim.AdamW(every, foreach=True, **common),
        "adamw_forloop": torch.optim.AdamW(every, foreach=False, **common),
        "galore": fullrank.GaLore(groups(), **common),
        "fira": fullrank.Fira(groups(), **common),
    }
    if args.baseline_ref:  # the engine at another commit, timed in the same run (same load, same turns)
        baseline = tm.load_baseline(args.baseline_ref)
        opts[f"galore@{args.baseline_ref}"] = baseline.GaLore(groups(), **common)
        opts[f"fira@{args.baseline_ref}"] = baseline.Fira(groups(), **common)
    return opts


def is_projected_optimizer(name: str) -> bool:
    return not name.startswith("adamw")


# ---------------------------------------------------------------------------- timing
def time_steady(opts: dict, device, steps: int, per_turn: int) -> dict[str, list[float]]:
    samples = {name: [] for name in opts}
    names = list(opts)
    rounds = math.ceil(steps / per_turn)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            for _ in range(per_turn):
                if len(samples[name]) < steps:
                    samples[name].append(tm.time_call(opts[name].step, device))
    return samples


def profile_breakdown(opt, device, steps: int = 2) -> dict:
    """Self time per op class over ``steps`` steady steps (CPU time on CPU, device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tm.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        tm.synchronize(device)
    use_device = device.type == "cuda"
    classes = {"matmul": 0.0, "norms": 0.0, "svd_qr": 0.0, "other": 0.0}
    top = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = ev.self_device_time_total if use_device else ev.self_cpu_time_total
        if us <= 0:
            continue
        if ev.key in MATMUL_OPS:
            cls = "matmul"
        elif ev.key in NORM_OPS:
            cls = "norms"
        elif ev.key.startswith(SVD_OPS_PREFIX):
            cls = "svd_qr"
        else:
            cls = "other"
        classes[cls] += us
        top.append((us, ev.key))
    total = sum(classes.values()) or 1.0
    top.sort(reverse=True)
    return {
        "clock": "device self time" if use_device else "CPU self time",
        "per_step_s": {k: v / 1e6 / steps for k, v in classes.items()},
        "fraction": {k: v / total for k, v in classes.items()},
        "top_ops_per_step_s": [{"op": k, "s": us / 1e6 / steps} for us, k in top[:12]],
    }


@torch.no_grad()
def matmul_floor(named, args, device, reps: int) -> dict:
    """The two projection matmuls per projected matrix alone (R = PᵀG or G·Qᵀ, and W ← W + back(R))."""
    from fullrank.optim.units.projection import add_projected_back_, project, projection_side, truncated_projection
    from fullrank.optim.units.svd import randomized_svd

    work = []
    for _, p, pr in named:
        if not pr:
            continue
        side = projection_side("std", tuple(p.shape))
        U, _, Vh = randomized_svd(p.grad, args.rank)
        left, right = truncated_projection(U, Vh, args.rank, side, p.grad.dtype)
        work.append((p, left, right))
    flops = sum(4 * args.rank * p.numel() for p, _, _ in work)

    def run():
        for p, left, right in work:
            low = project(p.grad, left, right)
            add_projected_back_(p, low, left, right, alpha=-1e-9)

    run()
    samples = [tm.time_call(run, device) for _ in range(reps)]
    s = tm.summary(samples)
    return {"matrices": len(work), "gflop_per_step": flops / 1e9, "time": s,
            "gflop_per_s": flops / 1e9 / s["median_s"]}


# ---------------------------------------------------------------------------- SVD
def _decaying(m: int, n: int, gen, device) -> torch.Tensor:
    """An m×n matrix with singular values 1/(i+1) (a gradient-like, decaying spectrum)."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return ((U * s) @ V.T).to(device)


def svd_benchmark(device, rank: int, reps: int, shape=(2048, 768)) -> dict:
    gen = torch.Generator().manual_seed(1)
    m, n = shape
    matrices = {"gaussian": torch.randn(m, n, generator=gen).to(device), "decaying_1_over_i": _decaying(m, n, gen, device)}
    out = {"shape": list(shape), "rank": rank, "oversample": 8, "power_iters": 2, "matrices": {}}
    for label, A in matrices.items():
        g = torch.Generator(device=device).manual_seed(0)
        exact_svd(A, rank), randomized_svd(A, rank, generator=g)  # warm-up
        t_exact = [tm.time_call(lambda: exact_svd(A, rank), device) for _ in range(reps)]
        t_rand = [tm.time_call(lambda: randomized_svd(A, rank, generator=g), device) for _ in range(reps)]
        Ue, Se, Vhe = exact_svd(A, rank)
        Ur, Sr, Vhr = randomized_svd(A, rank, generator=g)
        # Agreement of the right subspace (the side ``std`` projects a 2048×768 gradient on):
        # mean squared cosine of the principal angles, and the share of the optimal rank-r energy captured.
        cos2 = (Vhe @ Vhr.T).square().sum().item() / rank
        energy = (A @ Vhr.T).square().sum().item() / (A @ Vhe.T).square().sum().item()
        se, sr = tm.summary(t_exact)["median_s"], tm.summary(t_rand)["median_s"]
        out["matrices"][label] = {
            "exact": tm.summary(t_exact), "randomized": tm.summary(t_rand), "speedup": se / sr,
            "subspace_mean_cos2": cos2, "energy_captured_vs_exact": energy,
            "top_singular_value_rel_err": abs(Sr[0].item() - Se[0].item()) / Se[0].item(),
        }
    return out


# ---------------------------------------------------------------------------- report
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["optimizers"]
    names = list(rows)
    steady = [rows[n]["steady"]["median_s"] * 1e3 for n in names]
    amort = [rows[n]["amortised_s"] * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], steady, 0.4, label="steady step (median)")
    ax.bar([i + 0.2 for i in x], amort, 0.4, label=f"amortised (SVD every {result['config']['gap']})")
    ref = rows["adamw_foreach"]["steady"]["median_s"] * 1e3
    ax.axhline(ref * TARGETS["fira_vs_adamw"], color="k", ls="--", lw=1, label="1.15× AdamW (foreach)")
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("ms per optimizer.step()")
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['torch_threads']} threads"
    ax.set_title(f"LLaMA-130M shapes ({result['config']['layers']} layers), rank {result['config']['rank']}, "
                 f"{result['config']['dtype']} — {where}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(result: dict) -> None:
    rows = result["optimizers"]
    print(f"\n{'optimizer':16s} {'steady ms':>10s} {'refresh+ ms':>11s} {'amort. ms':>10s} "
          f"{'× AdamW fe':>10s} {'× AdamW loop':>12s} {'state MiB':>10s}")
    for name, r in rows.items():
        refresh = r.get("refresh_extra", {}).get("median_s")
        print(f"{name:16s} {r['steady']['median_s'] * 1e3:10.1f} "
              f"{(refresh * 1e3 if refresh else float('nan')):11.1f} {r['amortised_s'] * 1e3:10.1f} "
              f"{r['ratio_vs_adamw_foreach']:10.2f} {r['ratio_vs_adamw_forloop']:12.2f} "
              f"{tm.mib(r['state_bytes']):10.1f}")
    print("\nwhere the time goes (profiler self time per steady step):")
    for name, b in result["breakdown"].items():
        ps = b["per_step_s"]
        print(f"  {name:16s} matmul {ps['matmul'] * 1e3:8.1f} ms  norms {ps['norms'] * 1e3:7.1f} ms  "
              f"svd/qr {ps['svd_qr'] * 1e3:6.1f} ms  other (elementwise, copies) {ps['other'] * 1e3:8.1f} ms")
    mf = result["matmul_floor"]
    print(f"projection matmuls alone: {mf['time']['median_s'] * 1e3:.1f} ms for {mf['gflop_per_step']:.1f} GFLOP "
          f"({mf['gflop_per_s']:.0f} GFLOP/s)")
    for label, s in result["svd"]["matrices"].items():
        print(f"SVD {result['svd']['shape']} r={result['svd']['rank']} [{label}]: exact {s['exact']['median_s'] * 1e3:.1f} ms, "
              f"randomized {s['randomized']['median_s'] * 1e3:.1f} ms ({s['speedup']:.1f}×), "
              f"mean cos² {s['subspace_mean_cos2']:.3f}, energy {s['energy_captured_vs_exact']:.4f}")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  {t['name']}: target {t['target']}, measured {t['measured']:.2f} ({'met' if t['met'] else 'missed'}, gap {t['gap']:+.2f})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steady steps per optimizer")
    ap.add_argument("--per-turn", type=int, default=2, help="steps an optimizer takes per turn of the round robin")
    ap.add_argument("--refresh-reps", type=int, default=3,
                    help="timed refresh (SVD) steps per projected optimizer (0: steady steps only, amortised = steady)")
    ap.add_argument("--gap", type=int, default=200, help="T: steps between projection refreshes")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--svd-reps", type=int, default=5)
    ap.add_argument("--baseline-ref", default=None,
                    help="also time GaLore and Fira of the engine at this git ref (e.g. 573c892, engine v1)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/optimizer_step.json for cpu/float32, "
                         "optimizer_step_<device>_<dtype>.json otherwise)")
    ap.add_argument("--plot", type=Path, default=None, help="bar chart path (default docs/img/<json stem>_speed.png)")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    machine = tm.machine_info(device)  # before the measurements: its load average is the one at the start
    stem = "optimizer_step" if (args.device, args.dtype) == ("cpu", "float32") else f"optimizer_step_{args.device}_{args.dtype}"
    out = args.out or tm.RESULTS_DIR / f"{stem}.json"
    plot_path = args.plot or tm.DOCS_IMG_DIR / f"{out.stem}_speed.png"

    named = build_params(args.layers, device, dtype)
    n_proj = sum(p.numel() for _, p, pr in named if pr)
    n_plain = sum(p.numel() for _, p, pr in named if not pr)
    print(f"{len(named)} tensors: {n_proj / 1e6:.1f}M projected + {n_plain / 1e6:.1f}M plain parameters, "
          f"{args.dtype} on {device}, {torch.get_num_threads()} threads", flush=True)
    opts = make_optimizers(named, args)

    for name, opt in opts.items():  # first step builds state (and the first projection), then settle
        for _ in range(3):
            opt.step()
        tm.synchronize(device)
        print(f"  warmed up {name}", flush=True)

    steady = time_steady(opts, device, args.steps, args.per_turn)
    print("  steady steps timed", flush=True)
    refresh = tm.time_refreshes({n: o for n, o in opts.items() if is_projected_optimizer(n)}, device,
                                args.refresh_reps, args.gap) if args.refresh_reps else {}
    print("  refresh steps timed", flush=True)
    breakdown = {name: profile_breakdown(opt, device) for name, opt in opts.items()} if args.profile else {}
    floor = matmul_floor(named, args, device, reps=max(5, args.steps // 2))
    svd = svd_benchmark(device, args.rank, args.svd_reps)

    rows = {}
    for name, opt in opts.items():
        s = tm.summary(steady[name])
        row = {"steady": s, "samples_s": steady[name]}
        if name in refresh:
            rf = refresh[name]
            row["refresh"] = tm.summary(rf["refresh"])
            row["refresh_extra"] = tm.summary(rf["extra"])
            row["refresh_samples_s"] = rf
            row["amortised_s"] = tm.amortised(s["median_s"], row["refresh_extra"]["median_s"], args.gap)
        else:
            row["amortised_s"] = s["median_s"]
        row["state_bytes"] = optimizer_state_bytes(opt)
        row["state_bytes_all_reachable"] = tm.state_bytes(opt)
        rows[name] = row
    for name, row in rows.items():
        for ref in ("adamw_foreach", "adamw_forloop"):
            row[f"ratio_vs_{ref}"] = row["amortised_s"] / rows[ref]["amortised_s"]
            row[f"steady_ratio_vs_{ref}"] = row["steady"]["median_s"] / rows[ref]["steady"]["median_s"]

    fira_ratio = rows["fira"]["ratio_vs_adamw_foreach"]
    svd_speedup = svd["matrices"]["gaussian"]["speedup"]
    targets = [
        {"name": "Fira amortised step / AdamW (foreach) step", "target": TARGETS["fira_vs_adamw"],
         "measured": fira_ratio, "met": fira_ratio <= TARGETS["fira_vs_adamw"],
         "gap": fira_ratio - TARGETS["fira_vs_adamw"]},
        {"name": "Fira amortised step / AdamW (for-loop, CPU default) step", "target": TARGETS["fira_vs_adamw"],
         "measured": rows["fira"]["ratio_vs_adamw_forloop"],
         "met": rows["fira"]["ratio_vs_adamw_forloop"] <= TARGETS["fira_vs_adamw"],
         "gap": rows["fira"]["ratio_vs_adamw_forloop"] - TARGETS["fira_vs_adamw"]},
        {"name": "randomized SVD speedup over exact (2048×768, r=256, Gaussian)",
         "target": TARGETS["randomized_svd_speedup"], "measured": svd_speedup,
         "met": svd_speedup >= TARGETS["randomized_svd_speedup"],
         "gap": svd_speedup - TARGETS["randomized_svd_speedup"]},
    ]
    result = {
        "benchmark": "optimizer_step",
        "command": "python bench/optimizer_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "config": {"layers": args.layers, "rank": args.rank, "gap": args.gap, "dtype": args.dtype,
                   "steps": args.steps, "refresh_reps": args.refresh_reps, "weight_decay": args.weight_decay,
                   "lr": 1e-3, "projected_params": n_proj, "plain_params": n_plain,
                   "projection_svd": "exact (engine default)"},
        "optimizers": rows,
        "breakdown": breakdown,
        "matmul_floor": floor,
        "svd": svd,
        "targets": targets,
        "measured_elsewhere_ratio_vs_adamw": ELSEWHERE,
    }
    tm.finish(result, out, plot_path, print_report, plot)
    return result


if __name__ == "__main__":
    main()
