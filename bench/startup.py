"""How long the ``fullrank`` command takes to answer before it does any work: ``--version``,
``pretrain --help``, ``finetune --help``, ``memory --help`` and an argument error (target: ≤ 1 s each
on the 2-core CPU). Each command runs ``--repeats`` times as a fresh process; the median and the
range are reported, beside a bare ``python -c pass`` (the interpreter's own start-up) and ``import
torch`` (what the commands no longer pay).

    python bench/startup.py                 # writes bench/results/startup.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
TARGET_S = 1.0


def commands() -> dict[str, list[str]]:
    fullrank = shutil.which("fullrank")
    cli = [fullrank] if fullrank else [sys.executable, "-m", "fullrank"]
    return {
        "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
        "python -c 'import torch' (for comparison)": [sys.executable, "-c", "import torch"],
        "fullrank --version": [*cli, "--version"],
        "fullrank pretrain --help": [*cli, "pretrain", "--help"],
        "fullrank finetune --help": [*cli, "finetune", "--help"],
        "fullrank memory --help": [*cli, "memory", "--help"],
        "fullrank pretrain --rank x (argument error)": [*cli, "pretrain", "--rank", "x"],
    }


def time_command(argv: list[str], repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "runs": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    results = {}
    for name, command in commands().items():
        results[name] = time_command(command, args.repeats)
        r = results[name]
        print(f"{name:48s} median {r['median_s']:.2f} s  (min {r['min_s']:.2f}, max {r['max_s']:.2f})", flush=True)
    checked = {k: v for k, v in results.items() if k.startswith("fullrank")}
    worst = max(v["median_s"] for v in checked.values())
    print(f"slowest fullrank command: median {worst:.2f} s (target ≤ {TARGET_S:g} s): {'met' if worst <= TARGET_S else 'missed'}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpus": os.cpu_count(), "load_average_1min": load,
        "repeats": args.repeats, "target_s": TARGET_S, "results": results,
    }, indent=1) + "\n")
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
