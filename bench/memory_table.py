"""README's memory table: traced peaks of LLaMA-7B (and 1B, 350M) training steps, one
``fullrank memory`` command per row, and the stacked-bar plot docs/img/memory_7b.png.

    PYTHONPATH=src python bench/memory_table.py            # bench/results/memory_7b.json + the plot
    PYTHONPATH=src python bench/memory_table.py --plot-only
    PYTHONPATH=src python bench/memory_table.py --nproc 1 2 4 8   # bench/results/memory_nproc.json

``--nproc``: the per-rank peaks of FSDP2 steps (``fullrank memory --fsdp --nproc N``, rank 0 traced)
of LLaMA-7B, 13B and 70B on each number of ranks, AdamW beside Fira, with the wall time of each
trace, and the project's goal commands (reported as refused where the engine refuses them today).

Every row is seq 256, batch 1 (one GaLore row: batch 16), traced on fake tensors (nothing is allocated). GaLore's README
measured its recipe (LLaMA-7B on a 24 GB RTX 4090: bf16 weights, 8-bit states, per-layer updates,
rank 1024, batch 1 x 256) at 22.72 GB, and at 22.8 GB with batch 16 and activation checkpointing:
the traced GaLore rows are compared with them (target: within 10%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory_7b.json"
PLOT = ROOT / "docs" / "img" / "memory_7b.png"
GALORE_MEASURED_GB = 22.72  # GaLore README, LLaMA-7B on an RTX 4090 (GB = 10^9 bytes)
GALORE_MEASURED_B16_GB = 22.8  # the same at batch 16 with activation checkpointing
RECIPE = dict(weights="bf16", states="8bit", layerwise=True)  # GaLore's 7B recipe

ROWS = [  # (label, model, trace settings)
    ("AdamW (fp32 master)", "llama_7b", dict(method="adamw", weights="fp32")),
    ("AdamW (pure bf16)", "llama_7b", dict(method="adamw", weights="bf16")),
    ("AdamW 8-bit", "llama_7b", dict(method="adamw8bit", weights="bf16")),
    ("GaLore's recipe (bf16, 8-bit, layer-wise, r 1024)", "llama_7b", dict(method="galore", rank=1024, **RECIPE)),
    ("Fira, GaLore's recipe", "llama_7b", dict(method="fira", rank=1024, **RECIPE)),
    ("Fira r 128, bf16-sr, 8-bit, layer-wise, checkpointing", "llama_7b",
     dict(method="fira", rank=128, weights="bf16-sr", states="8bit", layerwise=True, activation_checkpointing=True)),
    ("APOLLO-Mini (bf16, layer-wise)", "llama_7b", dict(method="apollo_mini", weights="bf16", layerwise=True)),
    ("GaLore's recipe, batch 16, checkpointing", "llama_7b",
     dict(method="galore", rank=1024, batch_size=16, activation_checkpointing=True, **RECIPE)),
    ("AdamW (fp32 master)", "llama_1b", dict(method="adamw", weights="fp32")),
    ("AdamW (pure bf16)", "llama_1b", dict(method="adamw", weights="bf16")),
    ("GaLore's recipe, r 512", "llama_1b", dict(method="galore", rank=512, **RECIPE)),
    ("Fira, GaLore's recipe, r 512", "llama_1b", dict(method="fira", rank=512, **RECIPE)),
    ("AdamW (fp32 master)", "llama_350m", dict(method="adamw", weights="fp32")),
    ("AdamW (pure bf16)", "llama_350m", dict(method="adamw", weights="bf16")),
    ("GaLore's recipe, r 256", "llama_350m", dict(method="galore", rank=256, **RECIPE)),
    ("Fira, GaLore's recipe, r 256", "llama_350m", dict(method="fira", rank=256, **RECIPE)),
]


NPROC_RESULTS = ROOT / "bench" / "results" / "memory_nproc.json"
NPROC_MODELS = ("llama_7b", "llama_13b", "llama_70b")
BF16 = dict(weights="bf16")
LOW = dict(weights="bf16-sr", states="8bit", layerwise=True)  # bf16 + stochastic rounding, 8-bit states, layer-wise
NPROC_ROWS = [  # (label, trace settings): seq 256, batch 1 per rank, FSDP2
    ("AdamW (bf16)", dict(method="adamw", **BF16)),
    ("AdamW (bf16), checkpointing", dict(method="adamw", activation_checkpointing=True, **BF16)),
    ("Fira r 128 (bf16)", dict(method="fira", rank=128, **BF16)),
    ("Fira r 128, bf16-sr, 8-bit, layer-wise", dict(method="fira", rank=128, **LOW)),
    ("Fira r 128, bf16-sr, 8-bit, layer-wise, checkpointing",
     dict(method="fira", rank=128, activation_checkpointing=True, **LOW)),
]
GOALS = [  # (label, model, settings, ranks, per-rank target GiB)
    ("goal: 7B, Fira r 128, bf16-sr, 8-bit, layer-wise, 8 ranks <= 4 GiB", "llama_7b",
     dict(method="fira", rank=128, **LOW), 8, 4.0),
    ("goal, with activation checkpointing", "llama_7b",
     dict(method="fira", rank=128, activation_checkpointing=True, **LOW), 8, 4.0),
    ("moonshot: 70B full-parameter pre-training, 8 ranks <= 22 GiB", "llama_70b",
     dict(method="fira", rank=128, activation_checkpointing=True, **LOW), 8, 22.0),
]


def command(model: str, settings: dict) -> str:
    """The ``fullrank memory`` command of a row."""
    parts = ["fullrank memory", f"--model {model}", f"--method {settings['method']}"]
    parts += [f"--rank {settings['rank']}"] if "rank" in settings else []
    parts += [f"--weights {settings.get('weights', 'fp32')}"]
    parts += [f"--batch-size {settings['batch_size']}"] if settings.get("batch_size", 1) != 1 else []
    parts += [f"--states {settings['states']}"] if settings.get("states", "32bit") != "32bit" else []
    parts += ["--layerwise"] if settings.get("layerwise") else []
    parts += ["--activation-checkpointing"] if settings.get("activation_checkpointing") else []
    parts += [f"--fsdp --nproc {settings['nproc']}"] if settings.get("fsdp") else []
    return " ".join(parts)


def run_nproc(models, counts, goals=True, on_row=None) -> list[dict]:
    """Every NPROC_ROWS setting of every model on every number of ranks (and the GOALS)."""
    from fullrank.memory import trace
    from fullrank.train.errors import ConfigError

    jobs = [(label, model, {**settings, "nproc": n, "fsdp": True}, None) for model in models
            for label, settings in NPROC_ROWS for n in counts]
    if goals:
        jobs += [(label, model, {**settings, "nproc": n, "fsdp": True}, target) for label, model, settings, n, target in GOALS]
    out, traced = [], {}  # a goal that is also a table row is traced once
    for label, model, settings, target in jobs:
        row = dict(label=label, model=model, settings=settings, command=command(model, settings))
        if target is not None:
            row["target_gib"] = target
        key = (model, tuple(sorted(settings.items())))
        try:
            if key not in traced:
                traced[key] = trace(model, **{"batch_size": 1, "seq_len": 256, **settings})
            result = traced[key]
            row.update(peak_bytes=result.peak_bytes, by_category=result.by_category, peak_phase=result.peak_phase,
                       resident_bytes=result.resident_bytes, seconds=result.seconds)
            if target is not None:
                row["met"] = result.peak_bytes <= target * 2**30
            print(f"{model:<10}{label:<36}{settings['nproc']:>3} ranks {result.peak_bytes / 2**30:8.2f} GiB  "
                  f"({result.peak_phase}, {result.seconds:.0f} s)", flush=True)
        except ConfigError as err:
            row["error"] = str(err)
            if target is not None:
                row["met"] = False
            print(f"{model:<10}{label:<36}{settings['nproc']:>3} ranks    error: {err}", flush=True)
        out.append(row)
        if on_row is not None:
            on_row(out)
    return out


def nproc_markdown(rows: list[dict], counts) -> str:
    """Per model and setting, the per-rank peak (GiB) on each number of ranks; then the goals."""
    head = "| model | setting | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in counts) + \
        f" | peak during ({counts[-1]} ranks) | s per trace | command ({counts[-1]} ranks) |"
    lines = [head, "|---|---|" + "---:|" * len(counts) + "---|---:|---|"]
    table = [r for r in rows if "target_gib" not in r]
    keys = list(dict.fromkeys((r["model"], r["label"]) for r in table))
    for model, label in keys:
        cells, last = [], None
        for n in counts:
            row = next((r for r in table if (r["model"], r["label"]) == (model, label) and r["settings"]["nproc"] == n), None)
            cells.append("—" if row is None or "peak_bytes" not in row else f"{row['peak_bytes'] / 2**30:.2f}")
            last = row or last
        seconds = [r["seconds"] for r in table if (r["model"], r["label"]) == (model, label) and "seconds" in r]
        phase = last.get("peak_phase", last.get("error", "")) if last else ""
        took = f"{min(seconds):.0f}–{max(seconds):.0f}" if seconds else "—"
        lines.append(f"| {model.replace('llama_', '').upper()} | {label} | " + " | ".join(cells) +
                     f" | {phase} | {took} | `{last['command'] if last else ''}` |")
    goals = [r for r in rows if "target_gib" in r]
    if goals:
        lines += ["", "| goal | per-rank peak GiB | target | met | command |", "|---|---:|---:|---|---|"]
        for r in goals:
            peak = f"{r['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in r else f"refused: {r['error']}"
            lines.append(f"| {r['label']} | {peak} | {r['target_gib']:g} | {'yes' if r['met'] else 'no'} | `{r['command']}` |")
    return "\n".join(lines)


def run_rows(rows) -> list[dict]:
    from fullrank.memory import trace
    from fullrank.train.errors import ConfigError

    out = []
    for label, model, settings in rows:
        row = dict(label=label, model=model, settings=settings, command=command(model, settings))
        try:
            result = trace(model, **{"batch_size": 1, "seq_len": 256, **settings})
            row.update(peak_bytes=result.peak_bytes, by_category=result.by_category, peak_phase=result.peak_phase,
                       resident_bytes=result.resident_bytes, seconds=result.seconds)
            print(f"{model:<11}{label:<56}{result.peak_bytes / 2**30:8.2f} GiB  ({result.peak_phase}, "
                  f"{result.seconds:.0f} s)", flush=True)
        except ConfigError as err:
            row["error"] = str(err)
            print(f"{model:<11}{label:<56}   error: {err}", flush=True)
        out.append(row)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fullrank.memory import CATEGORIES

    shown = [r for r in rows if r["model"] == "llama_7b" and "peak_bytes" in r]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(shown) + 1.6))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for i, row in enumerate(shown):
        left = 0.0
        for key, color in zip(CATEGORIES, colors):
            width = row["by_category"][key] / 2**30
            ax.barh(i, width, left=left, color=color, label=key.replace("_", " ") if i == 0 else None)
            left += width
        ax.text(left + 0.3, i, f"{row['peak_bytes'] / 2**30:.1f} GiB", va="center", fontsize=9)
    ax.axvline(GALORE_MEASURED_GB * 1e9 / 2**30, color="gray", ls="--", lw=1)
    ax.text(GALORE_MEASURED_GB * 1e9 / 2**30, len(shown) - 0.4, " GaLore measured 22.72 GB", color="gray", fontsize=8)
    ax.set_yticks(range(len(shown)), [r["label"] for r in shown], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("traced peak memory, GiB (LLaMA-7B, seq 256, batch 1 unless named; split at the peak)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max(r["peak_bytes"] for r in shown) / 2**30 * 1.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | setting | peak GiB | weights | grads | state | activations | temporaries | command |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "peak_bytes" not in r:
            lines.append(f"| {r['model']} | {r['label']} | — | | | | | | `{r['command']}` ({r['error']}) |")
            continue
        c = {k: v / 2**30 for k, v in r["by_category"].items()}
        lines.append(f"| {r['model']} | {r['label']} | **{r['peak_bytes'] / 2**30:.2f}** | {c['weights']:.2f} | "
                     f"{c['gradients']:.2f} | {c['optimizer_state']:.2f} | {c['activations']:.2f} | "
                     f"{c['temporaries']:.2f} | `{r['command']}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    parser.add_argument("--models", nargs="+", default=None,
                        help="default: llama_7b llama_1b llama_350m, or llama_7b llama_13b llama_70b with --nproc")
    parser.add_argument("--nproc", nargs="+", type=int, default=None, metavar="N",
                        help="trace FSDP2 steps on these numbers of ranks instead (writes memory_nproc.json)")
    parser.add_argument("--no-goals", dest="goals", action="store_false", help="with --nproc: skip the goal commands")
    parser.add_argument("--output", type=Path, default=None, help="with --nproc: where the JSON goes")
    args = parser.parse_args(argv)
    if args.nproc:
        return main_nproc(args, sys.argv[1:] if argv is None else list(argv))
    args.models = args.models or ["llama_7b", "llama_1b", "llama_350m"]
    if args.plot_only:
        rows = json.loads(RESULTS.read_text())["rows"]
    else:
        import os
        import torch

        start = time.perf_counter()
        rows = run_rows([r for r in ROWS if r[1] in args.models])
        comparison = []
        for label, measured in (("GaLore's recipe (bf16", GALORE_MEASURED_GB),
                                ("GaLore's recipe, batch 16", GALORE_MEASURED_B16_GB)):
            row = next((r for r in rows if r["model"] == "llama_7b" and r["label"].startswith(label)), None)
            if row and "peak_bytes" in row:
                comparison.append(dict(row=row["label"], measured_gb=measured, traced_gb=row["peak_bytes"] / 1e9,
                                       relative_error=row["peak_bytes"] / 1e9 / measured - 1))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(
            command="python bench/memory_table.py", torch=torch.__version__, load_average=os.getloadavg(),
            wall_s=time.perf_counter() - start, galore_readme_comparison=comparison, rows=rows), indent=2) + "\n")
        for c in comparison:
            print(f"{c['row']}: traced {c['traced_gb']:.2f} GB vs measured {c['measured_gb']} GB "
                  f"({c['relative_error']:+.1%})")
    print(markdown(rows))
    plot(rows, PLOT)
    print(f"wrote {RESULTS} and {PLOT}")
    return 0


def main_nproc(args, argv: list) -> int:
    import os

    import torch

    counts = sorted(set(args.nproc))
    if counts[0] < 1:
        raise SystemExit(f"--nproc: rank counts must be positive integers, got {counts[0]}")
    models = args.models or list(NPROC_MODELS)
    start = time.perf_counter()
    output = args.output or NPROC_RESULTS
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict], complete: bool) -> None:
        """The results so far (after every trace: a run stopped midway keeps what it traced)."""
        output.write_text(json.dumps(dict(
            command=" ".join(["PYTHONPATH=src python bench/memory_table.py", *argv]), date=time.strftime("%Y-%m-%d"),
            torch=torch.__version__, threads=torch.get_num_threads(), load_average=os.getloadavg(),
            wall_s=time.perf_counter() - start, complete=complete, nproc=counts, batch_size=1, seq_len=256,
            traced_rank=0, rows=rows), indent=2) + "\n")

    rows = run_nproc(models, counts, goals=args.goals, on_row=lambda done: save(done, False))
    save(rows, True)
    print(nproc_markdown(rows, counts))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
