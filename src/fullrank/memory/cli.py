"""``fullrank memory``: the traced peak of a training step beside AdamW's, and what fits a budget.

Only argparse and the config's flag values are imported here: torch and transformers load in the
handler, so ``fullrank memory --help`` does not wait for them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..train.config import STATE_PRECISIONS, WEIGHT_PRECISIONS

GIB = 2**30

HELP = """\
Trace the peak memory of two real training iterations (forward, backward, an optimizer step with a
subspace refresh, zero_grad) on fake tensors: nothing is allocated, so LLaMA-7B traces on a laptop.
Peak bytes per category (weights, gradients, optimizer state, activations, temporaries) are torch's
MemTracker's; AdamW's trace in the same settings (torch.optim.AdamW, 32-bit states, not layer-wise)
is printed beside it.

--fsdp --nproc N traces the per-rank peak of fullrank pretrain --fsdp on N GPUs (FSDP2, the GPU's
bf16 compute and fp32 gradient reduction) on a fake process group, as rank 0: rank 0 holds
ceil(m/N) rows of every m-row weight, the last ranks fewer, and may be lighter. Two more
categories: all-gathered layers (the unsharded parameters of the layers being computed) and
reduce-scatter inputs (whole gradients before they are reduce-scattered). --nproc without --fsdp is
refused: DDP replicates everything, so each rank needs the one-process peak plus DDP's gradient
buckets.

examples:
  fullrank memory --model llama_7b --method adamw --weights bf16
  fullrank memory --model llama_7b --method galore --rank 1024 --weights bf16 --states 8bit --layerwise
  fullrank memory --model llama_7b --method fira --rank 128 --weights bf16-sr --states 8bit --layerwise \\
      --activation-checkpointing --budget 16 --json fira_7b.json
  fullrank memory --model llama_13b --method fira --rank 128 --weights bf16 --fsdp --nproc 8
  fullrank memory --model llama_70b --method fira --rank 256 --weights bf16 --fsdp --budget 80 --max-nproc 64
"""


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got '{text}'")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


def register(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("memory", help="trace the peak memory of a training step (no allocation)",
                            description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_7b",
                        help="llama_tiny, llama_20m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b, llama_13b, "
                             "llama_70b, a LlamaConfig config.json or a Hugging Face model folder (default: llama_7b)")
    parser.add_argument("--method", default="fira", help="any fullrank.make_optimizer name: adamw, adamw8bit, galore, "
                        "fira, apollo_mini, ... (default: fira)")
    parser.add_argument("--rank", type=_positive_int, default=None, help="projection rank (default: paper Table 2's)")
    parser.add_argument("--batch-size", type=_positive_int, default=1,
                        help="sequences per step, per rank with --nproc (default: 1)")
    parser.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--weights", choices=WEIGHT_PRECISIONS, default="fp32",
                        help="fp32 (master weights, bf16 autocast), bf16 (pure) or bf16-sr (pure, stochastic rounding)")
    parser.add_argument("--states", choices=STATE_PRECISIONS, default="32bit", help="optimizer-state precision")
    parser.add_argument("--layerwise", action="store_true", help="step each weight during backward (one gradient alive)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the model, gradients and optimizer state with FSDP2, as fullrank pretrain --fsdp")
    parser.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                        help="ranks (GPUs) of the sharded step, traced as rank 0; needs --fsdp (default: 1)")
    parser.add_argument("--max-nproc", type=_positive_int, default=None, metavar="M",
                        help="with --budget and --fsdp: the fewest ranks among 1, 2, 4, ... up to M whose per-rank "
                             "peak fits (instead of the largest batch at --nproc)")
    parser.add_argument("--budget", type=_positive_gib, default=None, metavar="GIB",
                        help="memory budget in GiB (per rank): does the step fit, the headroom, and the largest batch "
                             "that fits (or, with --max-nproc, the fewest ranks)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the fake tensors (cuda: CUDA's kernels, needs a CUDA build; default: cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not report each trace on stderr as it finishes")
    parser.set_defaults(handler=run)
    return parser


def ranks_text(settings: dict) -> str:
    """'8 ranks (FSDP2, rank 0 traced)', or '' for one unsharded process."""
    if not settings.get("fsdp"):
        return ""
    nproc = settings["nproc"]
    return f"{nproc} rank{'s' if nproc > 1 else ''} (FSDP2, rank {settings.get('traced_rank', 0)} traced)"


def describe(settings: dict) -> str:
    parts = [settings["method"] + (f" rank {settings['rank']}" if settings.get("rank") else ""),
             f"batch {settings['batch_size']} x seq {settings['seq_len']}", f"weights {settings['weights']}",
             f"states {settings['states']}"]
    parts += ["layer-wise"] if settings["layerwise"] else []
    parts += ["activation checkpointing"] if settings["activation_checkpointing"] else []
    parts += [ranks_text(settings)] if settings.get("fsdp") else []
    return ", ".join(parts)


def format_report(result: dict) -> str:
    """The table of one ``run`` result (method beside AdamW, GiB)."""
    from .tracer import CATEGORIES, COMMUNICATION_CATEGORIES

    ours, adamw = result["trace"], result["adamw"]
    name = ours["settings"]["method"]
    unit, size = ("GiB", GIB) if max(ours["peak_bytes"], adamw["peak_bytes"]) >= GIB else ("MiB", 2**20)
    sharded = bool(ours["settings"].get("fsdp"))
    lines = [f"{ours['settings']['model']}: {describe(ours['settings'])}"]
    if sharded and ours["settings"]["nproc"] > 1:
        lines.append(f"per-rank peak of rank 0 of {ours['settings']['nproc']}: it holds ceil(m/N) rows of every m-row "
                     "weight (FSDP2 pads every shard to that); the last ranks use fewer and keep less optimizer state")
    lines.append(f"{'peak ' + unit + ', by category':<24}{name:>12}{'adamw':>12}")
    for key in CATEGORIES + (COMMUNICATION_CATEGORIES if sharded else ()):
        lines.append(f"{key.replace('_', ' '):<24}{ours['by_category'][key] / size:>12.2f}"
                     f"{adamw['by_category'][key] / size:>12.2f}")
    lines.append(f"{'peak':<24}{ours['peak_bytes'] / size:>12.2f}{adamw['peak_bytes'] / size:>12.2f}")
    lines.append(f"peak during: {ours['peak_phase']} ({name}), {adamw['peak_phase']} (adamw)")
    saving = adamw["peak_bytes"] - ours["peak_bytes"]
    lines.append(f"{'saving' if saving >= 0 else 'more than'} vs AdamW ({describe(adamw['settings'])}): "
                 f"{abs(saving) / size:.2f} {unit} ({abs(saving) / adamw['peak_bytes']:.1%})")
    budget = result.get("budget")
    if budget:
        fits = ours["peak_bytes"] <= budget["bytes"]
        head = budget["bytes"] - ours["peak_bytes"]
        per_rank = " per rank" if sharded else ""
        lines.append(f"budget {budget['gib']:g} GiB{per_rank}: {'fits' if fits else 'does not fit'}, "
                     f"{'headroom' if fits else 'over by'} {abs(head) / size:.2f} {unit}")
        search = budget.get("nproc_search")
        if search is not None:
            tried = ", ".join(f"{t['nproc']}: {t['peak_bytes'] / size:.2f}" for t in search["tried"])
            if search["fewest_nproc"]:
                lines.append(f"fewest ranks that fit: {search['fewest_nproc']} (traced per-rank peaks, {unit}: {tried})")
            else:
                lines.append(f"fewest ranks that fit: none up to {search['max_nproc']} (traced per-rank peaks, "
                             f"{unit}: {tried})")
        elif budget["largest_batch_size"]:
            lines.append(f"largest batch{per_rank} that fits: {budget['largest_batch_size']} "
                         f"(traced peak {budget['peak_bytes_at_largest'] / size:.2f} {unit}; "
                         f"{budget['bytes_per_sequence'] / size:.3f} {unit} per sequence)")
        else:
            lines.append("largest batch that fits: none (not even one sequence)")
    lines.append(f"traced in {result['seconds']:.0f} s")
    return "\n".join(lines)


def trace_line(trace) -> str:
    """One progress line: what was traced, its peak and its time."""
    s = trace.settings
    what = s["method"] + (f" rank {s['rank']}" if s.get("rank") else "")
    where = f", {s['nproc']} rank{'s' if s['nproc'] > 1 else ''} (FSDP2)" if s.get("fsdp") else ""
    unit, size = ("GiB", GIB) if trace.peak_bytes >= GIB else ("MiB", 2**20)
    return (f"  traced {what}, batch {s['batch_size']}{where}: peak {trace.peak_bytes / size:.2f} {unit} "
            f"({trace.peak_phase}), {trace.seconds:.0f} s")


def plan(settings: dict, budget_gib: float | None, max_nproc: int | None) -> str:
    """What ``measure`` is about to do, in one paragraph (printed before the first trace)."""
    from .tracer import rank_counts

    what = f"{settings['model']}, {settings['method']}"
    own_baseline = settings["method"] == "adamw" and not settings.get("layerwise") and settings.get("states") == "32bit"
    if max_nproc is not None:
        counts = ", ".join(map(str, rank_counts(max_nproc)))
        return (f"fullrank memory: searching the fewest FSDP2 ranks among {counts} whose per-rank peak (rank 0) fits "
                f"{budget_gib:g} GiB at batch {settings['batch_size']} ({what}; one trace per count, stopping at the "
                f"first that fits){'' if own_baseline else ', then AdamW at that count'}; each trace runs two training "
                "iterations on fake tensors")
    ranks = settings["nproc"]
    where = f" on {ranks} rank{'s' if ranks > 1 else ''} (FSDP2, rank 0 traced)" if settings.get("fsdp") else ""
    text = f"fullrank memory: tracing {what}{where}" + ("" if own_baseline else ", then AdamW in the same settings")
    if budget_gib is not None:
        text += f", then the largest batch that fits {budget_gib:g} GiB (one more trace per batch it tries)"
    return text + "; each trace runs two training iterations on fake tensors"


def measure(*, budget_gib: float | None = None, max_nproc: int | None = None, progress: bool = False,
            **settings) -> dict:
    """Trace the step and AdamW's beside it, and the budget's search: the largest batch that fits,
    or with ``max_nproc`` the fewest FSDP2 ranks; the JSON result. ``progress``: a line on stderr
    per trace as it finishes."""
    from ..train.errors import ConfigError
    from .tracer import adamw_settings, check_settings, fewest_ranks, largest_batch, trace

    check_settings(**settings)
    if max_nproc is not None:
        if budget_gib is None:
            raise ConfigError("--max-nproc: it searches the fewest ranks that fit a budget; give --budget GIB too")
        if not settings.get("fsdp"):
            raise ConfigError("--max-nproc: it searches over FSDP2 ranks; add --fsdp")
        if settings.get("nproc", 1) > 1:
            raise ConfigError(f"--max-nproc with --nproc {settings['nproc']}: give --nproc N (the largest batch at N "
                              "ranks) or --max-nproc M (the fewest ranks up to M), not both")

    def report(result) -> None:
        if progress:
            print(trace_line(result), file=sys.stderr, flush=True)

    if progress:
        print(plan({**settings, "nproc": settings.get("nproc", 1)}, budget_gib, max_nproc), file=sys.stderr, flush=True)
    start = time.perf_counter()
    budget_bytes = None if budget_gib is None else budget_gib * GIB
    search = None
    if max_nproc is not None:
        search, ours = fewest_ranks(budget_bytes, max_nproc, on_trace=report,
                                    **{k: v for k, v in settings.items() if k not in ("nproc", "fsdp")})
    else:
        ours = trace(**settings)
        report(ours)
    baseline = adamw_settings(ours.settings)
    if all(ours.settings.get(key) == value for key, value in baseline.items()):
        adamw = ours  # the method is AdamW itself, in the baseline's settings: no second trace
    else:
        adamw = trace(**baseline)
        report(adamw)
    result = dict(peak_bytes=ours.peak_bytes, by_category=ours.by_category, adamw_peak_bytes=adamw.peak_bytes,
                  adamw_by_category=adamw.by_category, saving_bytes=adamw.peak_bytes - ours.peak_bytes,
                  trace=ours.to_dict(), adamw=adamw.to_dict())
    if budget_bytes is not None:
        result["budget"] = dict(gib=budget_gib, bytes=budget_bytes, fits=ours.peak_bytes <= budget_bytes,
                                headroom_bytes=budget_bytes - ours.peak_bytes)
        if search is not None:
            result["budget"]["nproc_search"] = search
        else:
            result["budget"].update(largest_batch(budget_bytes, ours, on_trace=report, **settings))
    result["seconds"] = time.perf_counter() - start
    return result


def run(args: argparse.Namespace) -> dict:
    settings = dict(model=args.model, method=args.method, rank=args.rank, batch_size=args.batch_size,
                    seq_len=args.seq_len, weights=args.weights, states=args.states, layerwise=args.layerwise,
                    activation_checkpointing=args.activation_checkpointing, device=args.device)
    if args.fsdp or args.nproc > 1:
        settings.update(nproc=args.nproc, fsdp=args.fsdp)
    result = measure(budget_gib=args.budget, max_nproc=args.max_nproc, progress=args.progress, **settings)
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
