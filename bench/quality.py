"""Quality tables of the Fira paper, reproduced at small scale with ``fullrank pretrain``.

Every row of every table trains the same small LLaMA on the same tokens of the real corpus in
``../shared/data/`` (Wikipedia, T5 tokenizer) from the same seeds, and reports the final validation
perplexity (mean ± half-range over seeds) and the measured optimizer-state bytes.

    python bench/quality.py --table all --profile cpu --jobs 2 --threads 1   # 2-core CPU scale
    python bench/quality.py --table all --profile gpu --jobs 6     # the numbers in docs/RESULTS.md (8+ OOM an 80 GB GPU)

Tables: ``table2`` (AdamW lr sweep, GaLore, Fira, LoRA, ReLoRA at rank d/4), ``table4`` (Fira
ablations), ``rank_sweep`` (Figure 6: Fira vs GaLore at ranks 4, 16, d/4, d/2, AdamW as a line),
``gamma`` (rebuttal Table r1), ``convention`` (exact G − P·R vs the official package's G − α·P·R),
``lr`` (Fira, GaLore and AdamW at lr 1e-2, 3e-3, 1e-3), ``adaptive`` (AdaRankGrad, FiraAdaptive beside GaLore
and Fira, with their ranks over steps). Runs shared between tables are
trained once (keyed by their full configuration). Run directories go to ``runs/bench/`` (ignored
by git); the results to ``bench/results/quality_<profile>.json`` and plots to ``docs/img/``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FULLRANK_DATA", ROOT.parent / "shared" / "data"))

PROFILES = {
    # llama_tiny (hidden 128, 4 layers): ~5.7 min a run on one core (--jobs 2 --threads 1 on 2 cores).
    "cpu": dict(model="llama_tiny", hidden=128, batch_size=8, grad_accum=1, max_steps=150,
                update_proj_gap=50, eval_every=50, eval_tokens=65_536),
    # llama_20m (hidden 256, 4 layers), 16K tokens a step, 6.5M tokens a run.
    "gpu": dict(model="llama_20m", hidden=256, batch_size=64, grad_accum=1, max_steps=400,
                update_proj_gap=100, eval_every=100, eval_tokens=262_144),
}
ADAMW_LRS = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)
GAMMAS = (1.0, 1.001, 1.01, 1.1, math.inf)
SUBSPACE_LRS = (1e-2, 3e-3, 1e-3)  # not in the paper (lr 0.01 for Fira/GaLore): does Fira's direction depend on it?


def rows_of(table: str, hidden: int) -> list[tuple[str, dict]]:
    """(label, run options) of each row of ``table``; rank d/4 unless the row says otherwise."""
    d4 = hidden // 4
    fira = ("Fira", dict(method="fira"))
    galore = ("GaLore", dict(method="galore"))
    if table == "table2":
        return [*[(f"AdamW lr={lr:g}", dict(method="adamw", lr=lr)) for lr in ADAMW_LRS], galore, fira,
                ("LoRA", dict(method="lora", lr=1e-3)), ("ReLoRA", dict(method="relora", lr=1e-3, relora_every=100))]
    if table == "table4":
        return [fira,
                ("Fira-matrix", dict(method="fira_matrix")),
                ("Fira w/o scaling (GaLore-add)", dict(method="fira_no_scaling")),
                ("Fira w/o limiter", dict(method="fira_no_limiter")),
                ("Fira-gradient-clipping", dict(method="fira_grad_clipping")),
                ("Fira-only-scaling", dict(method="fira_only_scaling"))]
    if table == "rank_sweep":
        return [(f"{name} r={r}", dict(method=method, rank=r))
                for r in (4, 16, d4, hidden // 2) for name, method in (("Fira", "fira"), ("GaLore", "galore"))]
    if table == "gamma":
        return [(f"Fira γ={g:g}", dict(method="fira", optim_args={"gamma": g})) for g in GAMMAS]
    if table == "convention":
        return [("Fira, residual G − P·R (exact, ours)", dict(method="fira")),
                ("Fira, residual G − α·P·R (official package)",
                 dict(method="fira", optim_args={"residual_convention": "official"}))]
    if table == "lr":
        return [(f"{name} lr={lr:g}", dict(method=method, lr=lr)) for lr in SUBSPACE_LRS
                for name, method in (("Fira", "fira"), ("GaLore", "galore"), ("AdamW", "adamw"))]
    if table == "adaptive":
        return [galore, fira, ("AdaRankGrad", dict(method="adarankgrad")),
                ("FiraAdaptive", dict(method="fira_adaptive"))]
    raise ValueError(f"table must be one of {TABLES} or 'all', got {table!r}")


TABLES = ("table2", "table4", "rank_sweep", "gamma", "convention", "lr", "adaptive")


def run_options(profile: dict, row: dict, seed: int) -> dict:
    """The full configuration of one run (what the run key hashes)."""
    options = dict(
        model=profile["model"], data=str(SHARED / "enwiki-2015-train.jsonl.gz"),
        val_data=str(SHARED / "enwiki-2015-validation.jsonl.gz"), tokenizer=str(SHARED / "t5-base"),
        seq_len=256, batch_size=profile["batch_size"], grad_accum=profile["grad_accum"],
        max_steps=profile["max_steps"], update_proj_gap=profile["update_proj_gap"],
        eval_every=profile["eval_every"], eval_tokens=profile["eval_tokens"], rank=profile["hidden"] // 4,
        lr=1e-2, seed=seed,
    )
    options.update({k: v for k, v in row.items()})
    return options


def run_key(options: dict) -> str:
    text = json.dumps({k: v for k, v in sorted(options.items()) if k not in ("data", "val_data", "tokenizer")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def command(options: dict, out_dir: Path, device: str) -> list[str]:
    argv = [sys.executable, "-m", "fullrank", "pretrain", "--out-dir", str(out_dir), "--overwrite",
            "--save-every", "0", "--no-progress", "--device", device]
    for key, value in options.items():
        if key == "optim_args":
            for k, v in value.items():
                argv += ["--optim-arg", f"{k}={v}"]
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train(options: dict, out_dir: Path, device: str, threads: int, collect_only: bool = False) -> dict:
    """Run (or reuse) one training run; returns its summary."""
    summary = out_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    if collect_only:
        raise RuntimeError(f"run {out_dir.name} has no summary (--collect-only)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "w") as handle:
        code = subprocess.call(command(options, out_dir, device), stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not summary.exists():
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"run {out_dir.name} failed (exit {code}): {' | '.join(tail)}")
    return json.loads(summary.read_text())


def curve(out_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of a run, from its metrics.jsonl."""
    points = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("val_loss") is not None:
            points.append((record["step"], record["val_loss"]))
    return points


def rank_stats(out_dir: Path) -> dict | None:
    """Rank and optimizer-state statistics over a run's steps, from the rank fields of its metrics.

    ``mean_rank`` averages the per-step mean rank over the projected matrices; the state bytes are
    logged whenever a rank changes, so their peak and step-weighted mean are exact. None for runs
    without a subspace optimizer (AdamW, LoRA).
    """
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train" and "rank_mean" in r]
    if not train:
        return None
    stats = dict(mean_rank=statistics.fmean(r["rank_mean"] for r in train), final_mean_rank=train[-1]["rank_mean"],
                 final_min_rank=train[-1]["rank_min"], final_max_rank=train[-1]["rank_max"])
    for field, name in (("optimizer_state_bytes", "state_bytes"), ("projected_state_bytes", "projected_state_bytes")):
        values, current = [], None
        for r in train:  # logged at every rank change: a step function
            current = r.get(field, current)
            values.append(current)
        if None not in values:
            stats.update({f"{name}_peak": max(values), f"{name}_mean": statistics.fmean(values)})
    return stats


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def machine() -> dict:
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                date=time.strftime("%Y-%m-%d"), cpu=platform.processor() or platform.machine())
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plot(table: str, profile_name: str, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "docs" / "img" / f"{table}_{profile_name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if table == "rank_sweep":
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("Fira", "GaLore"):
            pts = sorted((r["options"]["rank"], r["ppl_mean"], r["ppl_spread"]) for r in rows if r["label"].startswith(name))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=name, capsize=3)
        adamw = [r for r in rows if r["label"].startswith("AdamW")]
        if adamw:
            ax.axhline(adamw[0]["ppl_mean"], color="k", ls="--", label=adamw[0]["label"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel("validation perplexity")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            pts = r["curve"]
            ax.plot([p[0] for p in pts], [math.exp(p[1]) for p in pts], marker=".", label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("validation perplexity (seed 0)")
    ax.set_title(f"{table} ({profile_name} profile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def markdown(table: str, rows: list[dict]) -> str:
    if table == "adaptive":
        lines = [f"| {table} | val ppl (mean ± half-range) | seeds | mean rank over steps | final ranks min/mean/max | "
                 "state MiB, peak / step-mean | projected matrices' state KiB, peak / step-mean |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            k = r["ranks"] or fixed_rank_stats(r)
            projected = (f"{k['projected_state_bytes_peak'] / 2**10:.1f} / {k['projected_state_bytes_mean'] / 2**10:.1f}"
                         if "projected_state_bytes_peak" in k else "–")
            lines.append(f"| {r['label']} | {r['ppl_mean']:.2f} ± {r['ppl_spread']:.2f} | {len(r['ppl'])} | "
                         f"{k['mean_rank']:.1f} | {k['final_min_rank']} / {k['final_mean_rank']:.1f} / {k['final_max_rank']} | "
                         f"{k['state_bytes_peak'] / 2**20:.2f} / {k['state_bytes_mean'] / 2**20:.2f} | {projected} |")
        return "\n".join(lines)
    lines = [f"| {table} | val ppl (mean ± half-range) | seeds | optimizer state (MiB) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl_mean']:.2f} ± {r['ppl_spread']:.2f} | {len(r['ppl'])} | "
                     f"{r['state_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def fixed_rank_stats(row: dict) -> dict:
    """``rank_stats`` of a fixed-rank run trained before the pipeline logged ranks (constant rank and state)."""
    r = row["options"]["rank"]
    return dict(mean_rank=r, final_mean_rank=r, final_min_rank=r, final_max_rank=r,
                state_bytes_peak=row["state_bytes"], state_bytes_mean=row["state_bytes"])


def plot_adaptive_ranks(profile_name: str, rows: list[dict], run_root: Path) -> Path:
    """Per-matrix rank over steps (seed 0) of the adaptive rows, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fullrank.train.plot import draw_ranks, rank_history

    adaptive = [r for r in rows if r["options"]["method"] in ("adarankgrad", "fira_adaptive")]
    fig, axes = plt.subplots(1, len(adaptive), figsize=(6.5 * len(adaptive), 4.5), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], adaptive):
        draw_ranks(ax, rank_history(run_root / run_key(r["options"])), f"{r['label']} (seed 0, max rank {r['options']['rank']})")
    fig.tight_layout()
    out = ROOT / "docs" / "img" / f"adaptive_ranks_{profile_name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def recorded_curves(name: str, tables, profile: dict, seeds: int) -> dict:
    """{run key: validation curve} of the runs in ``bench/results/quality_<name>.json``: the stored curve
    of seed 0, the final perplexity alone (as a one-point curve) of the other seeds."""
    path = ROOT / "bench" / "results" / f"quality_{name}.json"
    stored = json.loads(path.read_text())["tables"] if path.exists() else {}
    out = {}
    for table in tables:
        by_label = {r["label"]: r for r in stored.get(table, [])}
        for label, row in rows_of(table, profile["hidden"]):
            if label not in by_label:
                continue
            for seed in range(min(seeds, len(by_label[label]["ppl"]))):
                key = run_key(run_options(profile, row, seed))
                final = [(profile["max_steps"], math.log(by_label[label]["ppl"][seed]))]
                out[key] = [tuple(p) for p in by_label[label]["curve"]] if seed == 0 else final
    return out


def recheck(jobs: dict, run_root: Path, name: str, args, recorded: dict) -> int:
    """Retrain every cached run of ``jobs`` from scratch and compare its validation losses with the cache;
    a run not cached is compared with ``recorded`` (``recorded_curves``: the published numbers).

    Training is deterministic for a given machine and thread count, so the current code reproduces
    a run when every validation loss is equal to the last bit. Writes
    ``bench/results/quality_<profile>_recheck.json``; exit status 1 when any run differs.
    """
    import shutil

    cached = {k: o for k, o in jobs.items() if (run_root / k / "summary.json").exists() or k in recorded}
    scratch = run_root.parent / f"{name}-recheck"
    print(f"rechecking {len(cached)} runs ({len(jobs) - len(cached)} neither cached nor recorded) into {scratch}",
          flush=True)
    for key in cached:
        shutil.rmtree(scratch / key, ignore_errors=True)
    rows = []
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(train, options, scratch / key, args.device, args.threads): key for key, options in cached.items()}
        for done in futures.as_completed(pending):
            key = pending[done]
            done.result()
            from_cache = (run_root / key / "summary.json").exists()
            before, after = (curve(run_root / key) if from_cache else recorded[key]), curve(scratch / key)
            if not from_cache and len(before) == 1:  # only the final perplexity was published
                after = after[-1:]
            worst = max((abs(a[1] - b[1]) for a, b in zip(before, after)), default=math.inf)
            row = dict(key=key, method=cached[key]["method"], seed=cached[key]["seed"], options=cached[key],
                       against="cache" if from_cache else f"quality_{name}.json",
                       cached_ppl=math.exp(before[-1][1]), rerun_ppl=math.exp(after[-1][1]),
                       max_abs_val_loss_diff=worst if len(before) == len(after) else math.inf)
            row["identical"] = row["max_abs_val_loss_diff"] == 0.0
            rows.append(row)
            print(f"  {key} {row['method']} seed {row['seed']}: ppl {row['cached_ppl']:.4f} ({row['against']}), "
                  f"{row['rerun_ppl']:.4f} now, max |Δ val loss| {row['max_abs_val_loss_diff']:.3g}", flush=True)
    out = ROOT / "bench" / "results" / f"quality_{name}_recheck.json"
    from _timing import git_info  # bench/ is the script's folder

    out.write_text(json.dumps(dict(machine=machine(), **git_info(), threads=args.threads, runs=rows),
                              indent=1, default=str) + "\n")
    same = sum(r["identical"] for r in rows)
    print(f"\n{same} of {len(rows)} runs reproduced bit for bit; results: {out.relative_to(ROOT)}")
    return 0 if same == len(rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="all", help=f"one of {', '.join(TABLES)} or 'all'")
    parser.add_argument("--profile", default="cpu", choices=tuple(PROFILES))
    parser.add_argument("--seeds", type=int, default=2, help="seeds per row (0, 1, …)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-steps", type=int,
                        help="override the profile's steps (quick checks; results go to quality_<profile>-<N>steps.json)")
    parser.add_argument("--collect-only", action="store_true", help="train nothing: tabulate the runs already done")
    parser.add_argument("--recheck", action="store_true",
                        help="retrain the selected runs into a scratch folder and report whether the current code "
                             "reproduces their validation losses (after an engine change): those of the cached run, "
                             "else those published in bench/results/quality_<profile>.json")
    args = parser.parse_args(argv)
    tables = TABLES if args.table == "all" else (args.table,)
    for table in tables:
        if table not in TABLES:
            parser.error(f"--table must be one of {', '.join(TABLES)} or 'all', got {table!r}")
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    if not (SHARED / "enwiki-2015-train.jsonl.gz").exists():
        parser.error(f"the corpus is missing: {SHARED}/enwiki-2015-train.jsonl.gz (set FULLRANK_DATA)")
    profile = dict(PROFILES[args.profile])
    if args.max_steps:
        profile.update(max_steps=args.max_steps, eval_every=max(1, args.max_steps // 2),
                       update_proj_gap=max(1, args.max_steps // 3))
    # a shortened run (quick check) never overwrites the profile's results or plots
    name = args.profile if not args.max_steps else f"{args.profile}-{args.max_steps}steps"
    run_root = ROOT / "runs" / "bench" / name

    jobs = {}
    for table in tables:
        for label, row in rows_of(table, profile["hidden"]):
            for seed in range(args.seeds):
                options = run_options(profile, row, seed)
                jobs.setdefault(run_key(options), options)
    if args.recheck:
        return recheck(jobs, run_root, name, args, recorded_curves(name, tables, profile, args.seeds))
    print(f"{len(jobs)} distinct runs for {', '.join(tables)} ({args.profile} profile, {args.jobs} at a time)", flush=True)
    summaries, failures = {}, {}
    started = time.time()
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(train, options, run_root / key, args.device, args.threads, args.collect_only): key
                   for key, options in jobs.items()}
        for done in futures.as_completed(pending):
            key = pending[done]
            try:
                summaries[key] = done.result()
                print(f"  [{len(summaries) + len(failures)}/{len(jobs)}] {key} {jobs[key]['method']} "
                      f"ppl {summaries[key].get('final_val_ppl', float('nan')):.2f} ({time.time() - started:.0f} s)", flush=True)
            except RuntimeError as err:
                failures[key] = str(err)
                print(f"  FAILED {err}", flush=True)

    out_path = ROOT / "bench" / "results" / f"quality_{name}.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {"tables": {}}
    results.update(profile=profile, machine=machine(), seeds=args.seeds)
    for table in tables:
        rows = []
        for label, row in rows_of(table, profile["hidden"]):
            keys = [run_key(run_options(profile, row, seed)) for seed in range(args.seeds)]
            if any(k not in summaries for k in keys):
                continue
            ppl = [summaries[k]["final_val_ppl"] for k in keys]
            mean, half = spread(ppl)
            rows.append(dict(label=label, options=run_options(profile, row, 0), ppl=ppl, ppl_mean=mean,
                             ppl_spread=half, state_bytes=summaries[keys[0]]["optimizer_state_bytes"],
                             curve=curve(run_root / keys[0]), ranks=rank_stats(run_root / keys[0])))
        results["tables"][table] = rows
        if rows:
            print("\n" + markdown(table, rows))
            print(f"plot: {plot(table, name, rows).relative_to(ROOT)}")
            if table == "adaptive" and any(r["options"]["method"] == "adarankgrad" for r in rows):
                print(f"plot: {plot_adaptive_ranks(name, rows, run_root).relative_to(ROOT)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nresults: {out_path.relative_to(ROOT)}; {len(failures)} {'missing' if args.collect_only else 'failed'} runs")
    return 1 if failures and not args.collect_only else 0


if __name__ == "__main__":
    sys.exit(main())
