"""The ``fullrank`` command line: ``fullrank pretrain``, ``finetune``, ``memory`` and ``plot``.

Every field of ``fullrank.train.config.TrainConfig`` is a flag of ``pretrain``; a YAML file given
with ``--config`` sets the same keys and flags override it. Bad input ends with one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._quiet import quiet_third_party
from .finetune.cli import register as register_finetune
from .memory.cli import register as register_memory
from .config import add_flags, given_values
from .train import config as C
from .train.errors import ConfigError, TrainingError

PRETRAIN_HELP = """\
Pre-train a LLaMA model (paper Table 5 configs, Hugging Face transformers, random init) with
AdamW, GaLore, Fira (and its ablations), LoRA or ReLoRA, and report validation perplexity and
optimizer-state memory (paper Table 2).

examples:
  fullrank pretrain --config configs/tiny_fira.yaml            # CPU demo on ../shared/data
  fullrank pretrain --model llama_60m --method fira --rank 128 --data c4 --max-steps 10000
  torchrun --nproc_per_node 4 -m fullrank pretrain --model llama_130m --method galore \\
      --batch-size 32 --grad-accum 4 --data c4 --max-steps 20000
  fullrank pretrain --resume runs/llama_60m_fira                # continue from the last checkpoint

Batch: tokens per step = batch_size x grad_accum x processes x seq_len (paper: 512 x 256 = 131K).
Schedule: linear warm-up over warmup_ratio of the steps, cosine decay to min_lr_ratio x lr.
Data: --data c4 streams allenai/c4 'en' from the Hugging Face Hub and needs internet; local
corpora are .txt (documents separated by blank lines), .jsonl / .json.gz / .jsonl.gz (JSON Lines
with a 'text' field, C4's shard format) or .parquet (a 'text' column) files, or folders of them.
Relative paths, on the command line or in a --config file, resolve against the current directory.
Defaults: --recipe auto is 'cpu' on a CPU (4 x 1 x 256 = 1,024 tokens per step, 16K eval tokens: a
llama_tiny step takes about a second) and 'paper' on a GPU (64 x 8 x 256 = 131K tokens, 10M eval
tokens); --recipe paper (or explicit --batch-size/--grad-accum/--eval-tokens) gives the paper's on a CPU.
Ctrl-C stops after the current step and saves a checkpoint; a second Ctrl-C stops at once and saves
the last completed step. --resume RUN_DIR --max-steps N extends a finished run (the lr schedule keeps
its original cosine: the added steps run at the floor min_lr_ratio x lr; --schedule-steps N re-plans it).
Engine options (--optim-arg KEY=VALUE): fullrank pretrain --help-optim lists them per method.
Outputs in the run directory: config.yaml, metrics.jsonl, tensorboard/ (when the tensorboard package
is installed), checkpoints/, hf_model/ (save_pretrained: the trained model, LoRA merged, and the
tokenizer), summary.json, loss.png, rank.png (when ranks changed: adaptive methods).
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors raised as ``ConfigError`` (one line, exit status 2)."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # 'fullrank pretrain' -> 'pretrain'
        raise ConfigError(f"{command}: {message}" if command else message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fullrank")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class HelpOptim(argparse.Action):
    """``--help-optim``: print every method's ``--optim-arg`` keys and exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(C.optim_help())
        parser.exit()


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="fullrank", description="Memory-efficient full-rank LLM training (Fira, GaLore).")
    parser.add_argument("--version", action="version", version=f"fullrank {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{pretrain,finetune,memory,plot}", parser_class=OneLineParser)
    sub.required = True
    pre = sub.add_parser("pretrain", help="pre-train a LLaMA model", description=PRETRAIN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pre.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                     help="YAML file of config keys (the flag names with underscores); flags override it")
    pre.add_argument("--help-optim", action=HelpOptim, help="list the --optim-arg keys of every method and exit")
    add_flags(pre, C.TrainConfig)
    register_finetune(sub)
    register_memory(sub)
    plot = sub.add_parser("plot", help="overlay the loss curves of run directories",
                          description="Plot train (smoothed) and validation loss of one or more run directories in one PNG.")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", default=None,
                      help="PNG to write (default: RUN_DIR/loss.png for one run, loss_curves.png in the first RUN_DIR for several)")
    plot.add_argument("--title", default=None, help="plot title")
    plot.add_argument("--ranks", action="store_true",
                      help="plot each projected matrix's rank over steps (one run) instead of the loss")
    plot.add_argument("--spikes", action="store_true",
                      help="plot loss and residual norm ‖S‖ with the subspace refreshes and the spikes marked (runs trained with --probe spikes)")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Config values: the YAML file's, then the flags given on the command line."""
    values = C.load_yaml(args.config) if getattr(args, "config", None) else {}
    return given_values(args, C.TrainConfig, values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fullrank`` command; returns the exit status."""
    quiet_third_party()  # before any subcommand imports transformers.Trainer, peft or galore-torch
    try:
        args = build_parser().parse_args(argv)
        if args.command == "pretrain":
            from .train.loop import pretrain

            pretrain(overrides_from_args(args))
        elif args.command in ("finetune", "memory"):
            args.handler(args)
        elif args.command == "plot":
            from .train.plot import plot_ranks, plot_runs

            if args.spikes:
                from .analysis.plots import plot_spikes

                out = args.output or Path(args.run_dirs[0]) / "spikes.png"
                try:
                    print(plot_spikes([Path(d) for d in args.run_dirs], Path(out)))
                except FileNotFoundError as err:
                    raise ConfigError(f"plot --spikes: {err}") from None
                return 0
            if args.ranks:
                if len(args.run_dirs) != 1:
                    raise ConfigError(f"plot --ranks: takes one RUN_DIR, got {len(args.run_dirs)}")
                out = args.output or Path(args.run_dirs[0]) / "rank.png"
                print(plot_ranks(Path(args.run_dirs[0]), Path(out), title=args.title))
            else:
                first = Path(args.run_dirs[0])
                out = args.output or first / ("loss.png" if len(args.run_dirs) == 1 else "loss_curves.png")
                print(plot_runs([Path(d) for d in args.run_dirs], Path(out), title=args.title))
        return 0
    except ConfigError as err:
        print(f"fullrank: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"fullrank: training failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        message = str(err).strip() or ("interrupted by Ctrl-C before the first step; nothing was trained (if a run "
                                       "directory was created, start it again with --overwrite)")
        print(f"fullrank: {message}", file=sys.stderr)
        return 130
    except SystemExit as err:  # --help
        return err.code if isinstance(err.code, int) else 0
