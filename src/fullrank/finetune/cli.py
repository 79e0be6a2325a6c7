"""``fullrank finetune``: every field of ``FinetuneConfig`` is a flag; ``--resume RUN_DIR`` continues a run."""
from __future__ import annotations

import argparse


from ..config import add_flags, given_values
from ..errors import ConfigError
from .config import FinetuneConfig

FINETUNE_HELP = """\
Fine-tune a causal LM on the commonsense-reasoning benchmark (Fira paper §5.3, Table 3) with any
fullrank optimizer (fira, galore, adamw, ...) or LoRA, on the Hugging Face Trainer, and report
per-task accuracy, optimizer-state memory, peak memory and throughput.

Defaults are the paper's recipe: rank 32, lr 1e-4, batch 16, 3 epochs, linear schedule with 100
warm-up steps, Q/K/V/Up/Down targeted. Prompts are LLM-Adapters' Alpaca template; the loss covers
the answer tokens only. Scoring: generate (greedy decoding + LLM-Adapters' answer extraction; an
answer-less generation is wrong) and likelihood (the option with the most likely response).

examples:
  fullrank finetune --model /models/llama-7b --method fira --bf16 --dtype bfloat16   # the paper's setting (GPU)
  fullrank finetune --model runs/llama_tiny_fira --method galore --train boolq --eval boolq,piqa \\
      --train-limit 500 --eval-limit 200 --max-steps 100 --warmup-steps 10 --lr 1e-3
  fullrank finetune --resume runs/finetune_llama-7b_fira        # continue from the last checkpoint

--model: a Hugging Face causal-LM folder, a `fullrank pretrain` run directory (its hf_model/, else
its newest checkpoint) or a fullrank LLaMA config name (random init). Tasks are files
DATA_DIR/TASK-{train,test}.jsonl.gz. Outputs in the run directory: config.yaml, metrics.jsonl,
checkpoints/, predictions.jsonl, summary.json, loss.png, hf_model/.
"""


def register(sub) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to the ``fullrank`` subparsers."""
    parser = sub.add_parser("finetune", help="fine-tune on the commonsense benchmark (paper Table 3)",
                            description=FINETUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its newest checkpoint")
    add_flags(parser, FinetuneConfig)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run ``fullrank finetune`` from parsed arguments."""
    from .training import finetune

    values = given_values(args, FinetuneConfig)
    if args.resume is None and "model" not in values:
        raise ConfigError("--model: required (or --resume RUN_DIR)")
    return finetune(values, resume=args.resume)
