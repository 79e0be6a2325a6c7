"""Quality tables of the Fira paper, reproduced at small scale with ``fullrank pretrain``.

Every row of every table trains the same small LLaMA on the same tokens of the real corpus in
``../shared/data/`` (Wikipedia, T5 tokenizer) from the same seeds, and reports the final validation
perplexity (mean ± half-range over seeds) and the measured optimizer-state bytes.

    python bench/quality.py --table all --profile cpu --jobs 2 --threads 1   # 2-core CPU scale
    python bench/quality.py --table all --profile gpu --jobs 6     # the numbers in docs/RESULTS.md (8+ OOM an 80 GB GPU)

Tables: ``table2`` (AdamW lr sweep, GaLore, Fira, LoRA, ReLoRA at rank d/4), ``table4`` (Fira
ablations), ``rank_sweep`` (Figure 6: Fira vs GaLore at ranks 4, 16, d/4, d/2, AdamW as a line),
``gamma`` (rebuttal Table r1), ``convention`` (exact G − P·R vs the official package's G − α·P·R),
``lr`` (Fira, GaLore and AdamW at lr 1e-2, 3e-3, 1e-3), ``sweep`` (seven methods at three learning rates
each; run it at ``--profile cpu`` and ``cpu_long``, the same tokens in 4x the steps), ``adaptive`` (AdaRankGrad, FiraAdaptive beside GaLore
and Fira, with their ranks over steps), ``methods`` (APOLLO, FRUGAL, LDAdam, SCALE and 8-bit Fira, set beside
table lr's Fira, GaLore and AdamW in docs/RESULTS.md). Runs shared between tables are
trained once (keyed by their full configuration). Run directories go to ``runs/bench/`` (ignored
by git); the results to ``bench/results/quality_<profile>.json`` and plots to ``docs/img/``.

Profile ``gpu60m`` is a study of its own: LLaMA-60M at Table 2's settings, one ``--seed`` per
call on one lent GPU, its rows (``STUDY_ROWS``, selectable with ``--rows``) sized to one call of at most
8 minutes; rows this build lacks are reported, not run. ``--quick`` is its CPU dry run:

    python bench/quality.py --profile gpu60m --seed 0                      # on the GPU (bench/gpu_session.sh)
    python bench/quality.py --quick --rows fira,adamw_lr1e-3 --threads 1   # seconds, on the CPU
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
sys.path.insert(0, str(ROOT / "bench"))  # _timing, also when this file is imported rather than run
SHARED = Path(os.environ.get("FULLRANK_DATA", ROOT.parent / "shared" / "data"))

PROFILES = {
    # llama_tiny (hidden 128, 4 layers): ~5.7 min a run on one core (--jobs 2 --threads 1 on 2 cores).
    "cpu": dict(model="llama_tiny", hidden=128, batch_size=8, grad_accum=1, max_steps=150,
                update_proj_gap=50, eval_every=50, eval_tokens=65_536),
    # the same tokens in 4x the steps (batch 2): the lr sweep's second horizon, at the cost of a cpu run.
    "cpu_long": dict(model="llama_tiny", hidden=128, batch_size=2, grad_accum=1, max_steps=600,
                     update_proj_gap=200, eval_every=200, eval_tokens=65_536),
    # llama_20m (hidden 256, 4 layers), 16K tokens a step, 6.5M tokens a run.
    "gpu": dict(model="llama_20m", hidden=256, batch_size=64, grad_accum=1, max_steps=400,
                update_proj_gap=100, eval_every=100, eval_tokens=262_144),
}
ADAMW_LRS = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)
GAMMAS = (1.0, 1.001, 1.01, 1.1, math.inf)
SUBSPACE_LRS = (1e-2, 3e-3, 1e-3)  # not in the paper (lr 0.01 for Fira/GaLore): does Fira's direction depend on it?
# table sweep: three learning rates a factor ~3 apart per method, around its paper's lr (1e-2 for Fira,
# GaLore and APOLLO; 1e-3 for FRUGAL, LDAdam and SCALE) and around the best of table lr where it is known
SWEEP = (("Fira", "fira", (1e-3, 3e-3, 1e-2)), ("GaLore", "galore", (3e-3, 1e-2, 3e-2)),
         ("AdamW", "adamw", (1e-3, 3e-3, 1e-2)), ("APOLLO", "apollo", (3e-3, 1e-2, 3e-2)),
         ("FRUGAL", "frugal", (1e-3, 3e-3, 1e-2)), ("LDAdam", "ldadam", (1e-3, 3e-3, 1e-2)),
         ("SCALE", "scale", (3e-4, 1e-3, 3e-3)))


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
    if table == "methods":  # the methods users compare against, at their papers' learning rates
        # (Fira, GaLore and AdamW at these settings are rows of table lr: the docs set them side by side)
        return [("Fira (32-bit states, retrained beside the others)", dict(method="fira")), ("APOLLO", dict(method="apollo")),
                ("FRUGAL lr=0.001", dict(method="frugal", lr=1e-3)), ("LDAdam lr=0.001", dict(method="ldadam", lr=1e-3)),
                ("SCALE lr=0.001", dict(method="scale", lr=1e-3)),
                ("Fira, 8-bit states", dict(method="fira", states="8bit"))]
    if table == "sweep":
        return [(f"{name} lr={lr:g}", dict(method=method, lr=lr)) for name, method, lrs in SWEEP for lr in lrs]
    raise ValueError(f"table must be one of {TABLES} or 'all', got {table!r}")


TABLES = ("table2", "table4", "rank_sweep", "gamma", "convention", "lr", "adaptive", "methods", "sweep")


def run_options(profile: dict, row: dict, seed: int) -> dict:
    """The full configuration of one run (what the run key hashes); a row's ``lr=None`` leaves the lr
    to ``fullrank pretrain``'s default for the method."""
    options = dict(
        model=profile["model"], data=str(SHARED / "enwiki-2015-train.jsonl.gz"),
        val_data=str(SHARED / "enwiki-2015-validation.jsonl.gz"), tokenizer=str(SHARED / "t5-base"),
        seq_len=profile.get("seq_len", 256), batch_size=profile["batch_size"], grad_accum=profile["grad_accum"],
        max_steps=profile["max_steps"], update_proj_gap=profile["update_proj_gap"],
        eval_every=profile["eval_every"], eval_tokens=profile["eval_tokens"], rank=profile["hidden"] // 4,
        lr=1e-2, seed=seed,
    )
    options.update({k: v for k, v in row.items()})
    if options["lr"] is None:
        del options["lr"]
    return options


def run_key(options: dict) -> str:
    text = json.dumps({k: v for k, v in sorted(options.items()) if k not in ("data", "val_data", "tokenizer")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def command(options: dict, out_dir: Path, device: str, threads: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "fullrank", "pretrain", "--out-dir", str(out_dir), "--overwrite",
            "--save-every", "0", "--no-progress", "--device", device]
    if threads:
        argv += ["--threads", str(threads)]
    for key, value in options.items():
        if key == "optim_args":
            for k, v in value.items():
                argv += ["--optim-arg", f"{k}={v}"]
        elif value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train(options: dict, out_dir: Path, device: str, threads: int, collect_only: bool = False,
          timeout_s: float | None = None, env_extra: dict | None = None) -> dict:
    """Run (or reuse) one training run; returns its summary. A run still going after ``timeout_s``
    seconds is killed (RuntimeError)."""
    summary = out_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    if collect_only:
        raise RuntimeError(f"run {out_dir.name} has no summary (--collect-only)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command(options, out_dir, device, threads), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"run {out_dir.name} stopped at the call's deadline ({timeout_s:.0f} s after its start)") from None
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


# ---------------------------------------------------------------------------- the gpu60m study
# LLaMA-60M on one lent GPU, one seed per call: every row is (id for --rows, label, run options).
# Rows whose method or option this build lacks are reported "not available in this build" and run
# once the library has them.
STUDY_ROWS = (  # in the order they train: a call cut short by its budget leaves the last ones for the next
    ("fira", "Fira (defaults: exact residual, torch Adam, eps 1e-8)", dict(method="fira")),
    ("galore", "GaLore", dict(method="galore")),
    ("adamw_lr1e-3", "AdamW lr=1e-3", dict(method="adamw", lr=1e-3)),
    ("adamw_lr3e-3", "AdamW lr=3e-3", dict(method="adamw", lr=3e-3)),
    ("fira_official_residual", "Fira, residual_convention=official",
     dict(method="fira", optim_args={"residual_convention": "official"})),
    ("fira_transformers_adam", "Fira, adam_convention=transformers",
     dict(method="fira", optim_args={"adam_convention": "transformers"})),
    ("fira_eps1e-6", "Fira, eps=1e-6", dict(method="fira", eps=1e-6)),
    ("apollo", "APOLLO", dict(method="apollo")),
    ("apollo_mini", "APOLLO-Mini", dict(method="apollo_mini")),
    ("scale", "SCALE (lr: fullrank pretrain's default)", dict(method="scale", lr=None)),
    ("fira_8bit", "Fira, 8-bit optimizer states", dict(method="fira", states="8bit")),
)
STUDY_ROW_IDS = tuple(row_id for row_id, _, _ in STUDY_ROWS)

# Throughput model of the plan (printed before training; the call's measured numbers go to the JSON).
TRAIN_CORPUS_TOKENS = 12_255_952  # T5 tokens of enwiki-2015-train (shared/data/README.md, section 3)
H200_BF16_FLOPS = 790e12  # an 8192³ bf16 matmul on the lent H200 (788 TFLOP/s, device KINDS.md; H100 SXM alike)
ASSUMED_MFU = 0.10  # of that peak, over all concurrent runs together (docs/RESULTS.md says why)
STARTUP_S = 25.0  # a run's fixed cost: imports, tokenizer, model, CUDA context, final export
SVD_S_PER_MATRIX = 0.02  # exact SVD of one 60M matrix at a refresh (engine v1, H100: 37.8 ms at 2048×768)
SVD_METHODS = ("galore", "fira", "adarankgrad")  # prefixes of the methods that refresh by SVD
STUDY_BUDGET_S = 480.0  # one call of at most 8 minutes
STUDY_JOBS = 4  # runs sharing the GPU at a time
DEADLINE_GRACE_S = 30.0  # a run still going this long after the budget is killed (the call's JSON is still written)
EVALS_PER_RUN = 4


def flops_per_token(model: str, seq_len: int) -> dict:
    """Training and forward FLOPs per token: 6·N and 2·N over the matmul weights N (attention and MLP
    projections, lm_head; the embedding lookup is free) plus attention's scores and mixing,
    12·L·s·d (4·L·s·d forward, causal mask not discounted)."""
    from fullrank.train.models import model_config

    c = model_config(model)
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    matmul = layers * (4 * h * h + 3 * h * inter) + h * c.vocab_size
    attention = 4 * layers * seq_len * h
    return dict(matmul_params=matmul, parameters=matmul + h * c.vocab_size + (2 * layers + 1) * h,
                projected_matrices=7 * layers, train=6 * matmul + 3 * attention, forward=2 * matmul + attention)


def estimate_row_s(profile: dict, options: dict) -> float:
    """Estimated GPU seconds of one run (training, evaluations, SVD refreshes), startup excluded."""
    flops = flops_per_token(profile["model"], profile["seq_len"])
    tokens = profile["max_steps"] * profile["batch_size"] * profile["grad_accum"] * profile["seq_len"]
    evals = -(-profile["max_steps"] // profile["eval_every"])
    work = tokens * flops["train"] + evals * profile["eval_tokens"] * flops["forward"]
    refreshes = profile["max_steps"] // profile["update_proj_gap"] if options["method"].startswith(SVD_METHODS) else 0
    return work / (H200_BF16_FLOPS * ASSUMED_MFU) + refreshes * flops["projected_matrices"] * SVD_S_PER_MATRIX


def estimate_call_s(row_seconds: list[float], jobs: int) -> float:
    """The runs share one GPU (their GPU seconds add up); each wave of ``jobs`` runs pays one startup."""
    return sum(row_seconds) + math.ceil(len(row_seconds) / jobs) * STARTUP_S if row_seconds else 0.0


def gpu60m_profile() -> dict:
    """LLaMA-60M (paper Table 2's smallest model) at seq 256, batch 32: as many steps (a multiple of 100)
    as fit both one pass over the training split and one call of ``STUDY_BUDGET_S`` for every row of
    ``STUDY_ROWS`` (those not in this build included, so the plan holds when they arrive)."""
    base = dict(model="llama_60m", hidden=512, seq_len=256, batch_size=32, grad_accum=1, update_proj_gap=200,
                eval_tokens=524_288)
    corpus_steps = TRAIN_CORPUS_TOKENS // (base["batch_size"] * base["grad_accum"] * base["seq_len"])
    steps = corpus_steps // 100 * 100
    while steps > 100:
        profile = dict(base, max_steps=steps, eval_every=steps // EVALS_PER_RUN)
        seconds = [estimate_row_s(profile, run_options(profile, row, 0)) for _, _, row in STUDY_ROWS]
        if estimate_call_s(seconds, STUDY_JOBS) <= STUDY_BUDGET_S:
            break
        steps -= 100
    return dict(base, max_steps=steps, eval_every=steps // EVALS_PER_RUN, corpus_steps=corpus_steps)


# --quick: the same code path at a size that runs in seconds on one CPU thread
QUICK_PROFILE = dict(model="llama_tiny", hidden=128, seq_len=64, batch_size=2, grad_accum=1, max_steps=4,
                     update_proj_gap=2, eval_every=2, eval_tokens=1024)


def unavailable_reason(options: dict) -> str | None:
    """Why this build cannot run a row (its method, or an option it does not accept), or None.

    Builds the row's optimizer over one small matrix, as ``fullrank pretrain`` would."""
    import torch

    import fullrank

    method, extra = options["method"], dict(options.get("optim_args", {}))
    if "states" in options:  # a pretrain flag of its own (--states), an engine option here
        extra["states"] = options["states"]
    if method not in fullrank.optimizer_methods():
        return f"method '{method}' is not in this build (fullrank.optimizer_methods(): {', '.join(fullrank.optimizer_methods())})"
    model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(8, 8, bias=False)})
    hyper = dict(lr=options.get("lr") or 1e-3, eps=options.get("eps", 1e-8))
    try:
        if method == "adamw":
            fullrank.make_optimizer("adamw", model.parameters(), **hyper, **extra)
        else:
            groups = fullrank.param_groups(model, rank=2, target_modules=("mlp",), update_proj_gap=2)
            fullrank.make_optimizer(method, groups, **hyper, **extra)
    except (TypeError, ValueError) as err:
        options_text = ", ".join(f"{k}={v}" for k, v in extra.items())
        return f"'{method}' with {options_text or 'these options'} is rejected by this build: {str(err).splitlines()[0]}"
    return None


def parse_rows(text: str | None) -> list[str]:
    """The row ids of ``--rows`` (comma-separated; all when None)."""
    if text is None:
        return list(STUDY_ROW_IDS)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in STUDY_ROW_IDS]
    if unknown or not chosen:
        raise ValueError(f"--rows: unknown row {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"allowed: {', '.join(STUDY_ROW_IDS)} (comma-separated)")
    return list(dict.fromkeys(chosen))


def run_record(row_id: str, label: str, options: dict, summary: dict, run_dir: Path) -> dict:
    """What the study keeps of one run (the run directory itself may not travel back)."""
    import _timing

    keep = ("final_val_ppl", "final_val_loss", "steps", "tokens", "tokens_per_s", "train_time_s", "wall_time_s",
            "optimizer_state_bytes", "projected_state_bytes", "peak_memory_bytes", "device", "parameters",
            "stopped_early")
    return dict(row=row_id, label=label, seed=options["seed"], options=options, **{k: summary.get(k) for k in keep},
                curve=curve(run_dir),
                trained_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((run_dir / "summary.json").stat().st_mtime)),
                git_commit=_timing.git_info().get("git_commit"), gpu=machine().get("gpu"))


def strip_run_dir(run_dir: Path) -> None:
    """Drop a finished run's checkpoint and exported model (hundreds of MB at 60M); keep its metrics."""
    import shutil

    for entry in run_dir.iterdir():
        if entry.is_dir() and entry.name not in ("tensorboard",):
            shutil.rmtree(entry, ignore_errors=True)


def study_rows_table(results: dict, selected: list[str]) -> list[dict]:
    """One entry per selected row: every seed cached for it, mean ± half-range, or why it has none.
    Only runs of the current configuration count (a recorded run of other steps or options does not)."""
    rows = []
    for row_id, label, row in STUDY_ROWS:
        if row_id not in selected:
            continue
        runs = sorted((r for key, r in results["runs"].items()
                       if r["row"] == row_id and key == run_key(run_options(results["profile"], row, r["seed"]))),
                      key=lambda r: r["seed"])
        entry = dict(id=row_id, label=label, seeds=[r["seed"] for r in runs], ppl=[r["final_val_ppl"] for r in runs])
        if row_id in results["unavailable"]:
            entry["status"] = "not available in this build: " + results["unavailable"][row_id]
        if runs:
            entry.update(zip(("ppl_mean", "ppl_spread"), spread(entry["ppl"])))
            entry.update(state_bytes=runs[0]["optimizer_state_bytes"], tokens_per_s=runs[0]["tokens_per_s"],
                         curve=runs[0]["curve"], curve_seed=runs[0]["seed"])
        rows.append(entry)
    return rows


def study_markdown(rows: list[dict]) -> str:
    lines = ["| row | val ppl (mean ± half-range) | seeds | optimizer state (MiB) | tokens/s (one run) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "ppl_mean" in r:
            lines.append(f"| {r['label']} | {r['ppl_mean']:.2f} ± {r['ppl_spread']:.2f} | {len(r['ppl'])} | "
                         f"{r['state_bytes'] / 2**20:.1f} | {r['tokens_per_s']:,.0f} |")
        else:
            lines.append(f"| {r['label']} | {r.get('status', 'not run yet')} | 0 | – | – |")
    return "\n".join(lines)


def study_plot(rows: list[dict], name: str, out: Path) -> Path | None:
    """Validation perplexity over steps (one seed) and final perplexity per row; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (rerun with --collect-only where it is)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "ppl_mean" in r]
    if not done:
        print("plot skipped: no row has a result yet")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw=dict(width_ratios=(3, 2)))
    for r in done:
        left.plot([p[0] for p in r["curve"]], [math.exp(p[1]) for p in r["curve"]], marker=".",
                  label=f"{r['label']} (seed {r['curve_seed']})")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("validation perplexity")
    left.legend(fontsize=6)
    right.barh([r["id"] for r in done], [r["ppl_mean"] for r in done], xerr=[r["ppl_spread"] for r in done],
               capsize=3)
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    right.set_xlabel("final val ppl (mean ± half-range over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: LLaMA-60M quality study" if "quick" not in name else f"{name}: CPU dry run")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def print_plan(name: str, profile: dict, plan: list[dict], jobs: int, budget_s: float, device: str) -> float:
    """Print the rows, steps, tokens and estimated minutes before anything trains; returns the estimate."""
    flops = flops_per_token(profile["model"], profile["seq_len"])
    per_step = profile["batch_size"] * profile["grad_accum"] * profile["seq_len"]
    tokens = per_step * profile["max_steps"]
    aggregate = H200_BF16_FLOPS * ASSUMED_MFU
    print(f"plan ({name}): {profile['model']} ({flops['parameters'] / 1e6:.1f}M parameters, "
          f"{flops['matmul_params'] / 1e6:.1f}M in matmuls), seq {profile['seq_len']}, batch "
          f"{profile['batch_size']} × {profile['grad_accum']} = {per_step:,} tokens a step, {profile['max_steps']} steps "
          f"= {tokens / 1e6:.2f}M tokens a run ({tokens / TRAIN_CORPUS_TOKENS:.0%} of the training split, one pass), "
          f"10% warm-up, cosine to 10%, T = {profile['update_proj_gap']}, rank {profile['hidden'] // 4}, "
          f"validation every {profile['eval_every']} steps on {profile['eval_tokens']:,} tokens")
    print(f"throughput assumed: {flops['train'] / 1e6:.0f} MFLOP per training token; {ASSUMED_MFU:.0%} of the H200's "
          f"{H200_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 = {aggregate / flops['train'] / 1e3:,.0f}K tokens/s over the "
          f"runs sharing the GPU; {STARTUP_S:.0f} s startup a run; {SVD_S_PER_MATRIX * 1e3:.0f} ms a matrix per SVD refresh")
    print(f"{'row':24s} {'seed':>4s}  {'est. GPU s (H200)':>17s}  status")
    train_s = []
    for p in plan:
        print(f"{p['id']:24s} {p['seed']:4d}  {p['estimate_s']:17.1f}  {p['status']}")
        if p["status"] == "to train":
            train_s.append(p["estimate_s"])
    total = estimate_call_s(train_s, jobs)
    note = "" if device == "cuda" else " (an H200 estimate: this run is on the CPU, where it does not apply)"
    print(f"estimate: {len(train_s)} runs to train, {jobs} at a time: {total / 60:.1f} min on one H200{note}; "
          f"budget {budget_s / 60:.1f} min (runs that would end past it wait for the next call)", flush=True)
    return total


def load_study_results(paths: list[Path]) -> dict:
    """Every run recorded in the given results files (later files win)."""
    runs = {}
    for path in paths:
        if path.exists():
            runs.update(json.loads(path.read_text()).get("runs", {}))
    return runs


def study(args, parser) -> int:
    """Train the selected rows of the gpu60m profile for one seed; reuse every cached run."""
    try:
        selected = parse_rows(args.rows)
    except ValueError as err:
        parser.error(str(err))
    import torch

    name = "gpu60m-quick" if args.quick else "gpu60m"
    profile = dict(QUICK_PROFILE) if args.quick else gpu60m_profile()
    device = "cpu" if args.quick else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out_env = os.environ.get("OUT")
    out_dir = Path(args.out) if args.out else Path(out_env) if out_env else None
    if args.quick and out_dir is None:
        import tempfile

        out_dir = Path(tempfile.mkdtemp(prefix="fullrank-quality-quick-"))
    results_path = (out_dir or ROOT / "bench" / "results") / f"quality_{name}.json"
    plot_path = (out_dir or ROOT / "docs" / "img") / f"quality_{name}.png"
    # run directories are large (checkpoints until stripped): under --out, never under $OUT (its files travel back)
    run_root = Path(args.out) / "runs" if args.out else out_dir / "runs" if args.quick else ROOT / "runs" / "bench" / name
    committed = ROOT / "bench" / "results" / f"quality_{name}.json"
    jobs = args.jobs or (1 if args.quick else STUDY_JOBS)
    budget_s = args.budget_s if args.budget_s is not None else (math.inf if args.quick else STUDY_BUDGET_S)

    results = dict(profile=profile, runs=load_study_results([committed, results_path]), unavailable={},
                   calls=json.loads(results_path.read_text()).get("calls", []) if results_path.exists() else [])
    plan = []
    for row_id, label, row in STUDY_ROWS:
        if row_id not in selected:
            continue
        options = run_options(profile, row, args.seed)
        key = run_key(options)
        reason = unavailable_reason(options)
        if reason:
            results["unavailable"][row_id] = reason
            status = "not available in this build"
        elif key not in results["runs"] and (run_root / key / "summary.json").exists():
            results["runs"][key] = run_record(row_id, label, options, json.loads((run_root / key / "summary.json").read_text()),
                                              run_root / key)
            status = "cached"
        else:
            status = "cached" if key in results["runs"] else "to train"
        plan.append(dict(id=row_id, label=label, key=key, seed=args.seed, options=options, status=status,
                         estimate_s=estimate_row_s(profile, options), reason=reason))
    estimate = print_plan(name, profile, plan, jobs, budget_s, device)
    for p in plan:
        if p["reason"]:
            print(f"  {p['id']}: not available in this build: {p['reason']}")

    todo = [p for p in plan if p["status"] == "to train"] if not args.collect_only else []
    call = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seed=args.seed, device=device, jobs=jobs,
                collect_only=args.collect_only,
                budget_s=budget_s if math.isfinite(budget_s) else None, estimated_s=estimate, rows=selected,
                cached=[p["id"] for p in plan if p["status"] == "cached"],
                unavailable=[p["id"] for p in plan if p["reason"]], trained=[], deferred=[], failed={})
    results["calls"].append(call)
    results.update(name=name, machine=machine())

    def write_results() -> None:  # after every run, so a call cut short keeps what it trained
        results["rows"] = study_rows_table(results, list(STUDY_ROW_IDS))
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    # on a GPU host the tokenizer may use this run's share of the cores; on the CPU they train
    tokenizer_threads = max(1, (os.cpu_count() or 1) // jobs) if device == "cuda" else 1
    env_extra = dict(TOKENIZERS_PARALLELISM="true" if tokenizer_threads > 1 else "false",
                     RAYON_NUM_THREADS=str(tokenizer_threads))
    started = time.time()
    launched: list[dict] = []  # rows started in this call, in order
    slowdown = 1.0  # measured / estimated wall time of the finished runs (1 until one finishes)
    with futures.ThreadPoolExecutor(jobs) as pool:
        running: dict = {}
        while todo or running:
            while todo and len(running) < jobs:
                elapsed = time.time() - started
                # the GPU is shared: the call ends when the work of every started run (and this one) is done
                predicted = slowdown * estimate_call_s([p["estimate_s"] for p in (*launched, todo[0])], jobs)
                if predicted > budget_s:
                    call["deferred"] = [p["id"] for p in todo]
                    print(f"  deferred to the next call (the call would end at {predicted:.0f} s > budget "
                          f"{budget_s:.0f} s, {elapsed:.0f} s in): {', '.join(call['deferred'])}", flush=True)
                    todo = []
                    break
                p = todo.pop(0)
                timeout = budget_s + DEADLINE_GRACE_S - elapsed if math.isfinite(budget_s) else None
                future = pool.submit(train, p["options"], run_root / p["key"], device, args.threads,
                                     timeout_s=timeout, env_extra=env_extra)
                running[future] = [p, time.time(), 1]
                launched.append(p)
            for entry in running.values():  # the most runs each one has shared the GPU with
                entry[2] = max(entry[2], len(running))
            if not running:
                break
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                p, start, sharing = running.pop(future)
                try:
                    summary = future.result()
                except RuntimeError as err:
                    call["failed"][p["id"]] = str(err)
                    print(f"  FAILED {p['id']}: {err}", flush=True)
                    continue
                wall = time.time() - start
                # its estimate: its GPU seconds times the most runs it shared the GPU with, plus startup
                slowdown = max(slowdown, wall / (p["estimate_s"] * sharing + STARTUP_S))
                call["measured_over_estimated"] = slowdown
                results["runs"][p["key"]] = run_record(p["id"], p["label"], p["options"], summary, run_root / p["key"])
                strip_run_dir(run_root / p["key"])
                call["trained"].append(p["id"])
                write_results()
                print(f"  {p['id']} seed {p['seed']}: ppl {summary['final_val_ppl']:.2f}, {summary['tokens_per_s']:,.0f} "
                      f"tokens/s, {wall:.0f} s ({time.time() - started:.0f} s into the call; measured/estimated "
                      f"time so far {slowdown:.2f}×)", flush=True)
    call["wall_s"] = time.time() - started
    trained_tokens = sum(results["runs"][p["key"]]["tokens"] for p in plan if p["id"] in call["trained"])
    if trained_tokens and call["wall_s"] > 0:
        flops = flops_per_token(profile["model"], profile["seq_len"])
        call["measured"] = dict(tokens=trained_tokens, tokens_per_s=trained_tokens / call["wall_s"],
                                mfu_vs_790_tflops=trained_tokens * flops["train"] / call["wall_s"] / H200_BF16_FLOPS)
    if "measured" in call and device == "cuda":
        print(f"measured: {trained_tokens / 1e6:.1f}M tokens in {call['wall_s']:.0f} s = "
              f"{call['measured']['tokens_per_s']:,.0f} tokens/s over the call "
              f"({call['measured']['mfu_vs_790_tflops']:.1%} of 790 TFLOP/s, startups included)")
    print("\n" + study_markdown(study_rows_table(results, selected)))
    picture = study_plot(study_rows_table(results, list(STUDY_ROW_IDS)), name, plot_path)
    results["plot"] = str(picture) if picture else None
    write_results()
    print(f"\nresults: {results_path}" + (f"; plot: {picture}" if picture else "") +
          f"; {len(call['trained'])} trained, {len(call['cached'])} cached, {len(call['deferred'])} deferred, "
          f"{len(call['failed'])} failed, {len(call['unavailable'])} not available in this build", flush=True)
    return 1 if call["failed"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help=f"one of {', '.join(TABLES)} or 'all' (default; not with --profile gpu60m)")
    parser.add_argument("--profile", choices=(*PROFILES, "gpu60m"), help="default cpu; "
                             "gpu60m: the LLaMA-60M study of one seed per call (see --rows, --seed, --quick)")
    parser.add_argument("--seeds", type=int, help="seeds per row (0, 1, …; default 2; gpu60m takes --seed)")
    parser.add_argument("--seed", type=int, help="gpu60m: the one seed this call trains (default 0)")
    parser.add_argument("--rows", help=f"gpu60m: comma-separated rows (default all): {', '.join(STUDY_ROW_IDS)}")
    parser.add_argument("--quick", action="store_true",
                        help="gpu60m: a CPU dry run of the same code path at a tiny size (llama_tiny, 4 steps)")
    parser.add_argument("--out", help="gpu60m: folder for the results JSON, the plot and the run directories "
                                      "(default: $OUT for the JSON and plot when set, else bench/results and docs/img)")
    parser.add_argument("--budget-s", type=float,
                        help=f"gpu60m: seconds this call may train (default {STUDY_BUDGET_S:.0f}; --quick: no limit); "
                             "a run that would end past it waits for the next call")
    parser.add_argument("--jobs", type=int, help=f"runs in parallel (default 1; gpu60m {STUDY_JOBS})")
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
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not (SHARED / "enwiki-2015-train.jsonl.gz").exists():
        parser.error(f"the corpus is missing: {SHARED}/enwiki-2015-train.jsonl.gz (set FULLRANK_DATA)")
    study_only = dict(seed=args.seed, rows=args.rows, quick=args.quick or None, out=args.out, budget_s=args.budget_s)
    if args.quick:
        if args.profile not in (None, "gpu60m"):
            parser.error(f"--quick is the dry run of --profile gpu60m, not of --profile {args.profile}")
        if args.device not in ("auto", "cpu"):
            parser.error(f"--quick runs on the CPU; --device must be auto or cpu, got {args.device!r}")
        args.profile = "gpu60m"
    args.profile = args.profile or "cpu"
    if args.profile == "gpu60m":
        for flag, value in (("--table", args.table), ("--seeds", args.seeds), ("--max-steps", args.max_steps),
                            ("--recheck", args.recheck or None)):
            if value is not None:
                parser.error(f"{flag} does not apply to --profile gpu60m (it trains one --seed per call; rows: --rows)")
        args.seed = 0 if args.seed is None else args.seed
        if args.seed < 0:
            parser.error(f"--seed must be 0 or more, got {args.seed}")
        if args.budget_s is not None and args.budget_s <= 0:
            parser.error(f"--budget-s must be more than 0 seconds, got {args.budget_s:g}")
        return study(args, parser)
    for flag, value in study_only.items():
        if value is not None:
            parser.error(f"--{flag.replace('_', '-')} applies to --profile gpu60m only (this is --profile {args.profile})")
    args.table = args.table or "all"
    args.seeds = 2 if args.seeds is None else args.seeds
    args.jobs = args.jobs or 1
    tables = TABLES if args.table == "all" else (args.table,)
    for table in tables:
        if table not in TABLES:
            parser.error(f"--table must be one of {', '.join(TABLES)} or 'all', got {table!r}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
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
