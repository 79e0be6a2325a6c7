"""``python -m fullrank.analysis``: analyse the records of the probes.

    python -m fullrank.analysis scaling RUN                 # Tables r6/r7: φ(G) vs φ(R) vs φ(G−P·R), and the bound
    python -m fullrank.analysis compare LOW_RUN FULL_RUN    # Fig. 3 / Tables 7-8: low-rank vs full-rank factors
    python -m fullrank.analysis variance [--probe RUN]      # Fig. 8: variance of φ against the rank
    python -m fullrank.analysis spikes RUN... --plot spikes.png   # spike metric, loss and ‖S‖ plot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import similarity as sim
from . import variance
from .plots import plot_same_dynamic, plot_scaling_sorted, plot_spikes, plot_variance
from .scaling_probe import read_probe
from .spikes import DEFAULT_THRESHOLD, DEFAULT_WINDOW, read_spikes, spike_summary


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _emit(result: dict, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")


def cmd_scaling(args) -> dict:
    probe = read_probe(args.run)
    same = sim.same_dynamic(probe, args.skip)
    bound = sim.bound_check(probe, skip=0)
    print(f"same dynamic (steps > {same['skip_steps']}): mean ‖v1 − v2‖/‖v1‖ / mean cosine of the per-matrix φ vectors")
    print("| rank | φ(G)~φ(R) | φ(G)~φ(G−PR) | φ(R)~φ(G−PR) | bound holds | tightness (median) |")
    print("|---:|---|---|---|---:|---:|")
    for rank, rows in same["ranks"].items():
        cells = [f"{_fmt(rows[p]['mean_relative_distance'])} / {_fmt(rows[p]['mean_cosine'])}"
                 for p in ("phi_G~phi_R", "phi_G~phi_res", "phi_R~phi_res")]
        b = bound[rank]
        print(f"| {rank} | {' | '.join(cells)} | {_fmt(b.get('holds_fraction'))} | {_fmt(b.get('tightness_median'))} |")
    if args.plot:
        print(f"wrote {plot_same_dynamic(same, Path(args.plot))}")
    return {"same_dynamic": same, "bound": bound}


def cmd_compare(args) -> dict:
    result = sim.across_runs(read_probe(args.low_run), read_probe(args.full_run), args.rank)
    print(f"low-rank φ(R) at rank {result['rank']} vs full-rank φ(G), averaged over steps")
    print("| level | n | Spearman (p) | Kendall (p) | Pearson (p) | cosine | MSE | relative RMSE |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for level in ("matrix_level", "column_level"):
        if level in result:
            s = result[level]
            print(f"| {level.split('_')[0]} | {s['n']} | {s['spearman']:.3f} ({s['spearman_p']:.1e}) | "
                  f"{s['kendall']:.3f} ({s['kendall_p']:.1e}) | {s['pearson']:.3f} ({s['pearson_p']:.1e}) | "
                  f"{s['cosine']:.4f} | {s['mse']:.4g} | {s['relative_rmse']:.3f} |")
    if args.plot:
        print(f"wrote {plot_scaling_sorted(result, Path(args.plot))}")
    return result


def cmd_variance(args) -> dict:
    ranks = [int(r) for r in args.ranks.split(",")]
    simulated = variance.simulate(ranks, rows=args.rows, cols=args.cols, steps=args.steps, trials=args.trials, seed=args.seed)
    measured = variance.measured(read_probe(args.probe), steps=args.steps) if args.probe else None
    print(f"variance of φ(R) over the first {args.steps} steps (simulation: i.i.d. N(0,1) {args.rows}x{args.cols}, {args.trials} trials)")
    print("| rank | simulated, over steps | relative, over steps | across trials | across columns | real, relative |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rank, v in simulated["ranks"].items():
        real = _fmt(measured["relative"].get(rank)) if measured else "-"
        print(f"| {rank} | {v['variance_over_steps']:.3g} | {v['relative_variance_over_steps']:.3g} | "
              f"{v['variance_across_trials']:.3g} | {v['column_variance']:.3g} | {real} |")
    if measured:
        print("real gradients (probe), relative variance over steps, mean over matrices: " +
              ", ".join(f"r={r}: {v:.3g}" for r, v in measured["relative"].items()) +
              f"; full rank: {measured['full_rank_relative']:.3g}")
    if args.plot:
        print(f"wrote {plot_variance(simulated, measured, Path(args.plot))}")
    return {"simulated": simulated, "measured": measured}


def cmd_spikes(args) -> dict:
    out = {}
    for run in args.runs:
        meta, steps = read_spikes(run)
        summary = spike_summary(steps, meta.get("update_proj_gap", 1), args.threshold, args.window)
        out[str(run)] = summary
        print(f"{run}: {summary['spikes']} spikes at steps {summary['spike_steps']} "
              f"({summary['spikes_after_refresh']} within {summary['within_steps_after_refresh']} steps after a refresh); "
              f"residual jump median/max {_fmt(summary['residual_jump_median'])}/{_fmt(summary['residual_jump_max'])}, "
              f"mean limited fraction {_fmt(summary['mean_limited_fraction'])}")
    if args.plot:
        print(f"wrote {plot_spikes([Path(r) for r in args.runs], Path(args.plot), args.threshold, args.window)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fullrank.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scaling", help="same-dynamic similarity and the bound, from one run's probe records")
    p.add_argument("run", help="run directory (or scaling_probe.jsonl)")
    p.add_argument("--skip", type=int, default=None, help="steps left out of the averages (default T)")
    p.add_argument("--plot", help="PNG of the cosine similarity over steps")
    p.add_argument("--json", help="write the full result here")
    p.set_defaults(fn=cmd_scaling)
    p = sub.add_parser("compare", help="low-rank run vs full-rank run (Fig. 3, Tables 7/8)")
    p.add_argument("low_run")
    p.add_argument("full_run")
    p.add_argument("--rank", type=int, help="probe rank of the low-rank run (default: its only one)")
    p.add_argument("--plot", help="PNG like Fig. 3")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("variance", help="Fig. 8: variance of φ vs rank (simulation, and a probe run)")
    p.add_argument("--probe", help="run directory with scaling-probe records")
    p.add_argument("--ranks", default="1,4,16,64,128")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--cols", type=int, default=352)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_variance)
    p = sub.add_parser("spikes", help="spike metric and plot of loss and ‖S‖ with the refreshes")
    p.add_argument("runs", nargs="+")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="relative rise over the running median")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--plot")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_spikes)
    args = parser.parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
