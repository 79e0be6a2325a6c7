"""README's memory table: traced peaks of LLaMA-7B (and 1B, 350M) training steps, one
``fullrank memory`` command per row, and the stacked-bar plot docs/img/memory_7b.png.

    PYTHONPATH=src python bench/memory_table.py            # bench/results/memory_7b.json + the plot
    PYTHONPATH=src python bench/memory_table.py --plot-only

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


def command(model: str, settings: dict) -> str:
    """The ``fullrank memory`` command of a row."""
    parts = ["fullrank memory", f"--model {model}", f"--method {settings['method']}"]
    parts += [f"--rank {settings['rank']}"] if "rank" in settings else []
    parts += [f"--weights {settings.get('weights', 'fp32')}"]
    parts += [f"--batch-size {settings['batch_size']}"] if settings.get("batch_size", 1) != 1 else []
    parts += [f"--states {settings['states']}"] if settings.get("states", "32bit") != "32bit" else []
    parts += ["--layerwise"] if settings.get("layerwise") else []
    parts += ["--activation-checkpointing"] if settings.get("activation_checkpointing") else []
    return " ".join(parts)


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
    parser.add_argument("--models", nargs="+", default=["llama_7b", "llama_1b", "llama_350m"])
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
