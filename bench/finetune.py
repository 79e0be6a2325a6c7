"""Table 3 analogue at CPU scale: fine-tune a `fullrank pretrain` base model on the commonsense
training sets with AdamW, LoRA, GaLore and Fira over several seeds; per-task accuracy, optimizer
state, peak memory and throughput.

    python bench/finetune.py --threads 1                     # pre-trains llama_tiny first (configs/tiny_fira.yaml)
    python bench/finetune.py --base runs/my_pretrain_run     # reuse a base model (run dir or HF folder)
    python bench/finetune.py --base /models/llama-7b --device cuda --steps 0 --train-limit 0 --eval-limit 0 \
        --lr 1e-4 --warmup-steps 100 --extra --dtype bfloat16   # the paper's setting (3 epochs) on a GPU

Every run is a separate `fullrank finetune` process (so peak memory is per run); results go to
``--out`` (JSON) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("adamw", "lora", "galore", "fira")


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        sys.exit(f"command failed ({code}), see {log}: {' '.join(cmd)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="base model (run dir / HF folder); default: pre-train llama_tiny")
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of the llama_tiny Fira pre-training")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps (0: the epochs of --extra flags / defaults)")
    p.add_argument("--train-limit", type=int, default=250, help="training records per task (0: all)")
    p.add_argument("--eval-limit", type=int, default=100, help="test records per task (0: all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir", default="runs/bench_finetune")
    p.add_argument("--out", default="bench/results/finetune_cpu.json")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: gather the summaries already in --runs-dir (runs split over processes)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `fullrank finetune` flags")
    args = p.parse_args()
    runs = ROOT / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    fullrank = [sys.executable, "-m", "fullrank"]
    started = time.time()
    if args.collect:
        return collect(args, runs)
    base, pretrain_cmd = args.base, None
    if base is None:
        base = str(runs / "base_llama_tiny_fira")
        pretrain_cmd = [*fullrank, "pretrain", "--config", "configs/tiny_fira.yaml", "--max-steps", str(args.pretrain_steps),
                        "--out-dir", base, "--overwrite", "--threads", str(args.threads), "--no-progress"]
        run(pretrain_cmd, runs / "pretrain.log")
    base_summary = Path(base) / "summary.json"
    results = []
    for method in args.methods.split(","):
        for seed in args.seeds.split(","):
            out = runs / f"{method}_seed{seed}"
            cmd = [*fullrank, "finetune", "--model", base, "--method", method, "--rank", str(args.rank), "--seed", seed,
                   "--max-steps", str(args.steps), "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit),
                   "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--max-new-tokens", "8",
                   "--threads", str(args.threads), "--device", args.device, "--out-dir", str(out), "--overwrite",
                   "--no-progress", "--no-save-model", *args.extra]
            t0 = time.time()
            run(cmd, runs / f"{method}_seed{seed}.log")
            summary = json.loads((out / "summary.json").read_text())
            summary["command"] = " ".join(cmd[2:])
            results.append(summary)
            print(f"{method} seed {seed}: {time.time() - t0:.0f} s, average "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["average"].items()), flush=True)
    report = {
        "base_model": base, "pretrain_command": " ".join(pretrain_cmd[2:]) if pretrain_cmd else None,
        "base_summary": json.loads(base_summary.read_text()) if base_summary.is_file() else None,
        "bench_command": " ".join(sys.argv), "wall_time_s": time.time() - started, "runs": results,
        "table": table(results),
    }
    Path(ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table"])


def collect(args, runs: Path) -> None:
    """Write the report from the ``METHOD_seedN/summary.json`` files already in ``runs``."""
    results = []
    for method in args.methods.split(","):
        for seed in args.seeds.split(","):
            path = runs / f"{method}_seed{seed}" / "summary.json"
            if path.is_file():
                summary = json.loads(path.read_text())
                summary["command"] = "finetune " + " ".join(
                    f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in yaml_config(path.parent).items() if k in ("model", "method", "rank", "seed", "max_steps",
                                                                         "train_limit", "eval_limit", "lr", "warmup_steps"))
                results.append(summary)
    base = runs / "base_llama_tiny_fira"
    report = {"base_model": str(base), "base_summary": json.loads((base / "summary.json").read_text())
              if (base / "summary.json").is_file() else None, "bench_command": " ".join(sys.argv), "runs": results,
              "table": table(results)}
    (ROOT / args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table"])


def yaml_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def table(results: list[dict]) -> str:
    """Markdown: mean ± spread over seeds of each task's accuracy (both scorings) and the costs."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    tasks = list(results[0]["examples"])
    lines = []
    for scoring in results[0]["accuracy"]:
        lines += [f"**{scoring}** accuracy (%), mean over seeds (min-max)", "",
                  "| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
        for m in methods:
            rs = [r for r in results if r["method"] == m]
            cells = []
            for t in [*tasks, None]:
                v = [100 * (r["average"][scoring] if t is None else r["accuracy"][scoring][t]) for r in rs]
                cells.append(f"{statistics.mean(v):.1f} ({min(v):.0f}-{max(v):.0f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| method | trainable params | optimizer state (MiB) | peak RSS (MiB) | tokens/s | final train loss |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        lines.append(f"| {m} | {rs[0]['trainable_parameters'] / 1e6:.2f}M | {rs[0]['optimizer_state_bytes'] / 2**20:.2f} | "
                     f"{statistics.mean(r['peak_memory_bytes'] for r in rs) / 2**20:.0f} | "
                     f"{statistics.mean(r['tokens_per_s'] for r in rs):,.0f} | "
                     f"{statistics.mean(r['final_train_loss'] for r in rs):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
