"""The paper's evidence at small scale: the runs behind docs/RESULTS.md "The paper's evidence".

    python bench/analysis.py runs --jobs 2 --threads 1          # probe runs + rebuttal rows (llama_tiny, enwiki)
    python bench/analysis.py runs --only probe_adamw,probe_galore
    python bench/analysis.py report                              # analyses -> bench/results/analysis_cpu.json, figures

Every run uses ``fullrank.train.experiment.run_experiment`` (the loop of ``fullrank pretrain`` with the
probes' hooks): llama_tiny, 150 steps of 8 x 256 tokens, T = 50, seed 0, the cpu profile of
bench/quality.py. Run directories go to runs/analysis/ (ignored by git).

* probe_adamw: full-rank AdamW (lr 1e-3) carrying the scaling probe at ranks 1, 4, 8 (d/16), 16, 32
  (d/4), 64 (d/2): same-dynamic factors (Tables r6/r7), the bound, the real-gradient variance (Fig. 8).
* probe_galore / probe_fira: GaLore / Fira at rank 32 carrying the probe at rank 32: the low-rank
  side of the across-runs comparison (Fig. 3, Tables 7/8, r1/r2).
* rows: Fira-only-scaling with SVD vs random P (Table r4), at ranks 4, 16, 64, 128 = full (Table r5),
  Fira under each stabiliser of Table r10 beside probe_fira's norm-growth limiter (spikes and ‖S‖
  logged), Flora (Tables r6/r7 baseline) and SGD with momentum (Fig. 15).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FULLRANK_DATA", ROOT.parent / "shared" / "data"))
RUNS = ROOT / "runs" / "analysis"
RESULTS = ROOT / "bench" / "results" / "analysis_cpu.json"
IMG = ROOT / "docs" / "img"
PROFILE = {"model": "llama_tiny", "steps": 150, "update_proj_gap": 50, "batch_size": 8, "seq_len": 256, "seed": 0, "eval_blocks": 256}
HIDDEN = 128

RUNS_SPEC: dict[str, dict] = {
    "probe_adamw": {"method": "adamw", "lr": 1e-3, "scaling_ranks": [1, 4, 8, 16, 32, 64]},
    "probe_galore": {"method": "galore", "rank": 32, "scaling_ranks": [32]},
    "probe_fira": {"method": "fira", "rank": 32, "scaling_ranks": [32]},
    "only_scaling_svd_r32": {"method": "fira_only_scaling", "rank": 32},
    "only_scaling_random_r32": {"method": "fira_only_scaling", "rank": 32, "optim_args": {"projector": "random"}},
    "only_scaling_r4": {"method": "fira_only_scaling", "rank": 4},
    "only_scaling_r16": {"method": "fira_only_scaling", "rank": 16},
    "only_scaling_r64": {"method": "fira_only_scaling", "rank": 64},
    "only_scaling_r128_full": {"method": "fira_only_scaling", "rank": 128},
    "r10_no_limiter": {"method": "fira", "rank": 32, "optim_args": {"limiter": "none"}},
    "r10_clip": {"method": "fira", "rank": 32, "optim_args": {"limiter": "clip"}},
    "r10_gradient_shrink": {"method": "fira", "rank": 32, "optim_args": {"limiter": "gradient_shrink"}},
    "r10_tensor_scaling": {"method": "fira", "rank": 32, "optim_args": {"limiter": "tensor_scaling"}},
    "flora_r32": {"method": "flora", "rank": 32},
    "sgd": {"method": "sgd", "lr": 0.1},
}


def _one(name: str, threads: int) -> tuple[str, dict]:
    import torch

    torch.set_num_threads(threads)
    from experiment import run_experiment  # (bench/experiment.py)

    spec = {**PROFILE, **RUNS_SPEC[name]}
    try:
        summary = run_experiment(RUNS / name, data=str(SHARED / "enwiki-2015-train.jsonl.gz"),
                                 val_data=str(SHARED / "enwiki-2015-validation.jsonl.gz"),
                                 tokenizer=str(SHARED / "t5-base"), **spec)
    except FloatingPointError as err:
        summary = {"diverged": str(err), **spec}
    return name, summary


def runs(args) -> None:
    names = list(RUNS_SPEC) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in RUNS_SPEC]
    if unknown:
        sys.exit(f"--only: unknown runs {unknown}; allowed: {', '.join(RUNS_SPEC)}")
    todo = [n for n in names if args.force or not (RUNS / n / "summary.json").exists()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        jobs = {pool.submit(_one, n, args.threads): n for n in todo}
        for job in futures.as_completed(jobs):
            try:
                name, summary = job.result()
                print(f"{name}: {json.dumps({k: summary.get(k) for k in ('final_val_loss', 'final_val_ppl', 'train_time_s', 'diverged')})}", flush=True)
            except Exception:  # noqa: BLE001 (report the failed run, keep the others going)
                print(f"{jobs[job]} failed:\n{traceback.format_exc()}", flush=True)


def report(args) -> None:
    from fullrank.analysis import similarity as sim
    from fullrank.analysis import variance
    from fullrank.analysis.plots import (
        plot_same_dynamic,
        plot_scaling_sorted,
        plot_spikes,
        plot_variance,
    )
    from fullrank.analysis.scaling_probe import read_probe
    from fullrank.analysis.spikes import read_spikes, spike_summary

    out = {"profile": PROFILE, "machine": {"python": platform.python_version(), "platform": platform.platform(),
                                           "date": time.strftime("%Y-%m-%d")}}
    full = read_probe(RUNS / "probe_adamw")
    same = sim.same_dynamic(full)
    out["same_dynamic"] = {r: {pair: {k: v for k, v in row.items() if k.startswith("mean") or k == "averaged_steps"}
                               for pair, row in rows.items()} for r, rows in same["ranks"].items()}
    out["bound"] = sim.bound_check(full, skip=0)
    out["across_runs"] = {}
    for low_name in ("probe_galore", "probe_fira"):
        if (RUNS / low_name / "scaling_probe.jsonl").exists():
            result = sim.across_runs(read_probe(RUNS / low_name), full)
            out["across_runs"][low_name] = result
            plot_scaling_sorted(result, IMG / f"analysis_fig3_{low_name.split('_')[1]}.png",
                                title=f"per-matrix φ averaged over steps: {low_name.split('_')[1]} r=32 vs AdamW")
    plot_same_dynamic(same, IMG / "analysis_same_dynamic.png")
    out["variance_simulated"] = variance.simulate(ranks=(1, 4, 16, 64, 128), rows=128, cols=352, steps=10, trials=32)
    out["variance_measured"] = variance.measured(full, steps=10)
    plot_variance(out["variance_simulated"], out["variance_measured"], IMG / "analysis_variance.png")
    out["spikes"], out["rows"] = {}, {}
    for name in RUNS_SPEC:
        summary_path = RUNS / name / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        out["rows"][name] = {k: summary.get(k) for k in ("method", "rank", "lr", "optim_args", "final_val_loss",
                                                         "final_val_ppl", "final_train_loss", "train_time_s")}
        if (RUNS / name / "spikes.jsonl").exists():
            _, steps = read_spikes(RUNS / name)
            out["spikes"][name] = spike_summary(steps, PROFILE["update_proj_gap"])
    plot_spikes([RUNS / n for n in ("probe_adamw", "probe_galore", "probe_fira") if (RUNS / n / "spikes.jsonl").exists()],
                IMG / "analysis_spikes.png")
    stabilisers = [RUNS / n for n in ("probe_fira", "r10_no_limiter", "r10_clip", "r10_gradient_shrink", "r10_tensor_scaling")
                   if (RUNS / n / "spikes.jsonl").exists()]
    if stabilisers:
        plot_spikes(stabilisers, IMG / "analysis_spikes_r10.png")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("runs", help="train the runs (skips those with a summary.json unless --force)")
    p.add_argument("--only", help="comma-separated run names")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    sub.add_parser("report", help="analyse the runs, write bench/results/analysis_cpu.json and docs/img/analysis_*.png")
    args = parser.parse_args()
    if args.command == "runs":
        if args.jobs < 1 or args.threads < 1:
            parser.error("--jobs and --threads must be at least 1")
        runs(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
