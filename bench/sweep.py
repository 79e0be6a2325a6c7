"""The learning-rate sweep's chosen runs (docs/RESULTS.md, "Learning-rate sweep of the methods").

``bench/quality.py --table sweep`` trains every row of a profile; this trains the runs named on the
command line (a second seed, a learning rate beyond the grid, the long horizon at a method's best
lr) into the same cache, with the same options and run keys, so ``quality.py`` reuses them, and
collects every cached run of the sweep's methods at both horizons.

    python bench/sweep.py run cpu_long:fira:3e-3:1 cpu:apollo:1e-3:0 --jobs 2   # PROFILE:METHOD:LR:SEED
    python bench/sweep.py table        # bench/results/quality_cpu_sweep.json, and the tables on stdout

Each run is one ``fullrank pretrain`` process on one thread (``--jobs`` of them at a time), as
``quality.py --jobs N --threads 1`` runs them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import quality

PROFILES = ("cpu", "cpu_long")
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # what ``table`` looks for in the cache
SEEDS = range(4)
RESULTS = Path(__file__).resolve().parent / "results" / "quality_cpu_sweep.json"
METHODS = {method: name for name, method, _ in quality.SWEEP}


def parse_run(spec: str) -> tuple[str, str, float, int]:
    """``PROFILE:METHOD:LR:SEED`` -> (profile, method, lr, seed), or a ValueError naming the part."""
    parts = spec.split(":")
    if len(parts) != 4:
        raise ValueError(f"run {spec!r}: expected PROFILE:METHOD:LR:SEED, e.g. cpu_long:fira:3e-3:1")
    profile, method, lr, seed = parts
    if profile not in PROFILES:
        raise ValueError(f"run {spec!r}: profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if method not in METHODS:
        raise ValueError(f"run {spec!r}: method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        lr_value, seed_value = float(lr), int(seed)
    except ValueError:
        raise ValueError(f"run {spec!r}: LR must be a number and SEED an integer") from None
    if not 0 < lr_value <= 1 or seed_value < 0:
        raise ValueError(f"run {spec!r}: LR must be in (0, 1] and SEED at least 0")
    return profile, method, lr_value, seed_value


def run_dir(runs: Path, profile: str, method: str, lr: float, seed: int) -> tuple[dict, Path]:
    options = quality.run_options(quality.PROFILES[profile], dict(method=method, lr=lr), seed)
    return options, runs / profile / quality.run_key(options)


def train(specs: list[str], runs: Path, jobs: int) -> int:
    todo = [(spec, *run_dir(runs, *parse_run(spec))) for spec in specs]

    def one(job) -> bool:
        spec, options, out = job
        start = time.perf_counter()
        try:
            summary = quality.train(options, out, "cpu", 1)
        except RuntimeError as err:
            print(f"{spec}: {err}", flush=True)
            return False
        print(f"{spec}: val ppl {summary['final_val_ppl']:.2f} ({time.perf_counter() - start:.0f} s, {out.name})", flush=True)
        return True

    with ThreadPoolExecutor(jobs) as pool:
        return 0 if all(pool.map(one, todo)) else 1


def collect(runs: Path) -> dict:
    """Every cached run of the sweep's methods, per profile: label, options and each seed's result."""
    out = {}
    for profile in PROFILES:
        rows = []
        for method, name in METHODS.items():
            for lr in LEARNING_RATES:
                found = []
                for seed in SEEDS:
                    summary = run_dir(runs, profile, method, lr, seed)[1] / "summary.json"
                    if summary.exists():
                        s = json.loads(summary.read_text())
                        found.append(dict(seed=seed, val_ppl=s["final_val_ppl"], state_bytes=s.get("optimizer_state_bytes"),
                                          key=summary.parent.name))
                if found:
                    rows.append(dict(label=f"{name} lr={lr:g}", options=dict(method=method, lr=lr), runs=found))
        out[profile] = rows
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| method | lr | val ppl, seed 0 | seed 1 | mean ± half-range |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        ppl = {r["seed"]: r["val_ppl"] for r in row["runs"]}
        name, lr = row["label"].split(" lr=")
        cells = [f"{ppl[s]:.1f}" if s in ppl else "—" for s in (0, 1)]
        spread = "{:.1f} ± {:.1f}".format(*quality.spread(list(ppl.values()))) if len(ppl) > 1 else "—"
        lines.append(f"| {name} | {lr} | {cells[0]} | {cells[1]} | {spread} |")
    return "\n".join(lines)


def table(runs: Path, output: Path, command: str) -> int:
    data = collect(runs)
    output.write_text(json.dumps(dict(command=command, date=time.strftime("%Y-%m-%d"),
                                      profiles={p: quality.PROFILES[p] for p in PROFILES}, rows=data), indent=1) + "\n")
    for profile, rows in data.items():
        print(f"\n{profile}\n{markdown(rows)}")
    print(f"\nwrote {output}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=quality.ROOT / "runs" / "bench",
                        help="the cache's root (quality.py's runs/bench); a profile's runs are in <runs>/<profile>/<key>")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the named runs (cached ones are reused)")
    run.add_argument("specs", nargs="+", metavar="PROFILE:METHOD:LR:SEED")
    run.add_argument("--jobs", type=int, default=2)
    collected = sub.add_parser("table", help="collect the cached runs into a JSON file and print the tables")
    collected.add_argument("--output", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.jobs < 1:
            parser.error(f"--jobs must be at least 1, got {args.jobs}")
        try:
            return train(args.specs, args.runs, args.jobs)
        except ValueError as err:
            parser.error(str(err))
    return table(args.runs, args.output, " ".join(["python bench/sweep.py", *argv]))


if __name__ == "__main__":
    sys.exit(main())
