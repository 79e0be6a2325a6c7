"""``fullrank memory``: the traced peak of a training step beside AdamW's, and what fits a budget."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .estimate import GIB
from ..train.config import STATE_PRECISIONS, WEIGHT_PRECISIONS
from .tracer import CATEGORIES, adamw_settings, largest_batch, trace

HELP = """\
Trace the peak memory of two real training iterations (forward, backward, an optimizer step with a
subspace refresh, zero_grad) on fake tensors: nothing is allocated, so LLaMA-7B traces on a laptop.
Peak bytes per category (weights, gradients, optimizer state, activations, temporaries) are torch's
MemTracker's; AdamW's trace in the same settings (torch.optim.AdamW, 32-bit states, not layer-wise)
is printed beside it.

examples:
  fullrank memory --model llama_7b --method adamw --weights bf16
  fullrank memory --model llama_7b --method galore --rank 1024 --weights bf16 --states 8bit --layerwise
  fullrank memory --model llama_7b --method fira --rank 128 --weights bf16-sr --states 8bit --layerwise \\
      --activation-checkpointing --budget 16 --json fira_7b.json
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
                        help="llama_tiny, llama_20m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b, a LlamaConfig "
                             "config.json or a Hugging Face model folder (default: llama_7b)")
    parser.add_argument("--method", default="fira", help="any fullrank.make_optimizer name: adamw, adamw8bit, galore, "
                        "fira, apollo_mini, ... (default: fira)")
    parser.add_argument("--rank", type=_positive_int, default=None, help="projection rank (default: paper Table 2's)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--weights", choices=WEIGHT_PRECISIONS, default="fp32",
                        help="fp32 (master weights, bf16 autocast), bf16 (pure) or bf16-sr (pure, stochastic rounding)")
    parser.add_argument("--states", choices=STATE_PRECISIONS, default="32bit", help="optimizer-state precision")
    parser.add_argument("--layerwise", action="store_true", help="step each weight during backward (one gradient alive)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--budget", type=_positive_gib, default=None, metavar="GIB",
                        help="memory budget in GiB: does the step fit, the headroom, and the largest batch that fits")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the fake tensors (cuda: CUDA's kernels, needs a CUDA build; default: cpu)")
    parser.set_defaults(handler=run)
    return parser




def describe(settings: dict) -> str:
    parts = [settings["method"] + (f" rank {settings['rank']}" if settings.get("rank") else ""),
             f"batch {settings['batch_size']} x seq {settings['seq_len']}", f"weights {settings['weights']}",
             f"states {settings['states']}"]
    parts += ["layer-wise"] if settings["layerwise"] else []
    parts += ["activation checkpointing"] if settings["activation_checkpointing"] else []
    return ", ".join(parts)


def format_report(result: dict) -> str:
    """The table of one ``run`` result (method beside AdamW, GiB)."""
    ours, adamw = result["trace"], result["adamw"]
    name = ours["settings"]["method"]
    unit, size = ("GiB", GIB) if max(ours["peak_bytes"], adamw["peak_bytes"]) >= GIB else ("MiB", 2**20)
    lines = [f"{ours['settings']['model']}: {describe(ours['settings'])}",
             f"{'peak ' + unit + ', by category':<24}{name:>12}{'adamw':>12}"]
    for key in CATEGORIES:
        lines.append(f"{key.replace('_', ' '):<24}{ours['by_category'][key] / size:>12.2f}"
                     f"{adamw['by_category'][key] / size:>12.2f}")
    lines.append(f"{'peak':<24}{ours['peak_bytes'] / size:>12.2f}{adamw['peak_bytes'] / size:>12.2f}")
    lines.append(f"peak during: {ours['peak_phase']} ({name}), {adamw['peak_phase']} (adamw)")
    saving = adamw["peak_bytes"] - ours["peak_bytes"]
    lines.append(f"saving vs AdamW ({describe(adamw['settings'])}): {saving / size:.2f} {unit} "
                 f"({saving / adamw['peak_bytes']:.1%})")
    budget = result.get("budget")
    if budget:
        fits = ours["peak_bytes"] <= budget["bytes"]
        head = budget["bytes"] - ours["peak_bytes"]
        lines.append(f"budget {budget['gib']:g} GiB: {'fits' if fits else 'does not fit'}, "
                     f"{'headroom' if fits else 'over by'} {abs(head) / size:.2f} {unit}")
        if budget["largest_batch_size"]:
            lines.append(f"largest batch that fits: {budget['largest_batch_size']} "
                         f"(traced peak {budget['peak_bytes_at_largest'] / size:.2f} {unit}; "
                         f"{budget['bytes_per_sequence'] / size:.3f} {unit} per sequence)")
        else:
            lines.append("largest batch that fits: none (not even one sequence)")
    lines.append(f"traced in {result['seconds']:.0f} s")
    return "\n".join(lines)


def measure(*, budget_gib: float | None = None, **settings) -> dict:
    """Trace the step and AdamW's beside it (and the budget's batch search): the JSON result."""
    start = time.perf_counter()
    ours = trace(**settings)
    adamw = trace(**adamw_settings(ours.settings))
    result = dict(peak_bytes=ours.peak_bytes, by_category=ours.by_category, adamw_peak_bytes=adamw.peak_bytes,
                  adamw_by_category=adamw.by_category, saving_bytes=adamw.peak_bytes - ours.peak_bytes,
                  trace=ours.to_dict(), adamw=adamw.to_dict())
    if budget_gib is not None:
        budget_bytes = budget_gib * GIB
        search = largest_batch(budget_bytes, ours, **settings)
        result["budget"] = dict(gib=budget_gib, bytes=budget_bytes, fits=ours.peak_bytes <= budget_bytes,
                                headroom_bytes=budget_bytes - ours.peak_bytes, **search)
    result["seconds"] = time.perf_counter() - start
    return result


def run(args: argparse.Namespace) -> dict:
    result = measure(model=args.model, method=args.method, rank=args.rank, batch_size=args.batch_size,
                     seq_len=args.seq_len, weights=args.weights, states=args.states, layerwise=args.layerwise,
                     activation_checkpointing=args.activation_checkpointing, device=args.device,
                     budget_gib=args.budget)
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
