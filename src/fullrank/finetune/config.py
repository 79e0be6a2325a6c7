"""``fullrank finetune``'s configuration: the five sections of ``fullrank.config``, with the paper's
recipe (§5.3) as defaults. Every field is a flag (``rank`` → ``--rank``). No torch here: the command
line reads it to answer ``--help`` at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import (
    WEIGHT_PRECISIONS,
    Config,
    Optim,
    Precision,
    Run,
    check,
    engine_methods,
    option,
    with_defaults,
)
from ..errors import ConfigError

LORA = "lora"
SCORINGS = ("generate", "likelihood")
DEFAULT_TRAIN = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
DEFAULT_EVAL = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "predictions.jsonl", "summary.json", "loss.png", "hf_model")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Model:
    """The model to fine-tune and its tokenizer."""

    name: str = option("", "Hugging Face causal-LM folder, `fullrank pretrain` run directory, or a fullrank LLaMA config name (random init)", flag="model")
    tokenizer: str = option("", "tokenizer folder or hub name (default: the model folder's own; t5-base for a config name)")


@dataclass
class Data:
    """The tasks (LLM-Adapters' format), how many records, and the batches."""

    train: list = option(DEFAULT_TRAIN, "comma-separated training tasks (their union is trained on)")
    eval: list = option(DEFAULT_EVAL, "comma-separated evaluation tasks (accuracy reported per task)")
    data_dir: str = option("../shared/data/commonsense", "folder of TASK-{train,test}.jsonl.gz files")
    train_limit: int = option(0, "training records drawn per task (0: all)")
    eval_limit: int = option(0, "test records drawn per task (0: all)")
    cutoff_len: int = option(256, "longest training sequence in tokens; longer examples are dropped")
    batch_size: int = option(16, "sequences per optimizer step")
    micro_batch_size: int = option(4, "sequences per forward pass (batch_size / micro_batch_size = gradient accumulation)")
    eval_batch_size: int = option(16, "sequences per evaluation forward pass")


@dataclass
class FinetuneOptim(with_defaults(Optim, "PaperFinetuneOptim", rank=32, lr=1e-4, lora_alpha=64.0, lora_dropout=0.05,
                                  target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])):
    """The optimizer (paper §5.3: rank 32, lr 1e-4, Q/K/V/Up/Down) and the linear schedule."""

    warmup_steps: int = option(100, "linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = option(1.0, "global gradient-norm clipping (0: off)")


@dataclass
class FinetunePrecision(with_defaults(Precision, "FinetuneWeights", weights="")):
    """The weights' dtype and precision, autocast and the optimizer state (an empty --weights: --dtype's)."""

    dtype: str = option("float32", "weight dtype: float32, bfloat16, float16")
    bf16: bool = option(False, "bf16 autocast (mixed precision) on CUDA")

    def validate(self) -> None:
        """``--weights`` sets the dtype it needs (``--dtype`` may only agree)."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: allowed: {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.weights:
            super().validate()
            dtype = "float32" if self.weights == "fp32" else "bfloat16"
            if self.dtype not in ("float32", dtype):
                raise ConfigError(f"--weights {self.weights} loads {dtype} weights; drop --dtype {self.dtype} or give --dtype {dtype}")
            self.dtype = dtype
        else:
            Precision(weights="fp32", states=self.states).validate()


@dataclass
class FinetuneRun(with_defaults(Run, "PaperFinetuneRun", max_steps=0, save_every=200)):
    """Epochs or steps, checkpoints, outputs and the scoring of the test sets."""

    epochs: float = option(3.0, "training epochs (ignored when --max-steps > 0)")
    scoring: list = option(list(SCORINGS), "comma-separated: generate (LLM-Adapters' answer extraction), likelihood (best option)")
    max_new_tokens: int = option(32, "tokens generated per test question (generate scoring)")
    save_model: bool = option(True, "save the fine-tuned model (LoRA merged) and tokenizer to RUN_DIR/hf_model")


@dataclass
class FinetuneConfig(Config):
    """Every option of ``fullrank finetune``, by section; the defaults are the paper's recipe (§5.3)."""

    model: Model = dataclasses.field(default_factory=Model)
    data: Data = dataclasses.field(default_factory=Data)
    optim: FinetuneOptim = dataclasses.field(default_factory=FinetuneOptim)
    precision: FinetunePrecision = dataclasses.field(default_factory=FinetunePrecision)
    run: FinetuneRun = dataclasses.field(default_factory=FinetuneRun)


FIELDS = {name: f for name, (_, f) in FinetuneConfig.fields().items()}
LIST_FIELDS = tuple(name for name, f in FIELDS.items() if str(f.type) == "list")
RESUME_FREE = ("threads", "progress", "device", "eval_batch_size", "activation_checkpointing")  # may change on --resume


def validate_options(cfg: FinetuneConfig) -> None:
    """The checks that need no model and no data (one-line ConfigErrors naming the flag)."""
    if not cfg.model.name:
        raise ConfigError("--model: required; give a Hugging Face causal-LM folder, a `fullrank pretrain` run directory "
                          "or a LLaMA config name")
    data, optim, run = cfg.data, cfg.optim, cfg.run
    optim.validate((*engine_methods(), LORA))
    cfg.precision.validate()
    run.validate()
    if run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: allowed: auto, cpu, cuda, got '{run.device}'")
    for name in ("batch_size", "micro_batch_size", "cutoff_len", "eval_batch_size"):
        check(name, cfg.get(name), 1, integer=True)
    for name in ("train_limit", "eval_limit", "max_steps", "warmup_steps"):
        check(name, cfg.get(name), 0, integer=True)
    check("max_grad_norm", optim.max_grad_norm, 0.0)
    check("max_new_tokens", run.max_new_tokens, 1, integer=True)
    check("epochs", run.epochs, 0.0)
    if run.max_steps == 0 and run.epochs <= 0:
        raise ConfigError(f"--epochs: must be > 0 when --max-steps is 0, got {run.epochs}")
    if data.batch_size % data.micro_batch_size:
        raise ConfigError(f"--batch-size: must be a multiple of --micro-batch-size ({data.micro_batch_size}), "
                          f"got {data.batch_size}")
    bad = [s for s in run.scoring if s not in SCORINGS]
    if bad or not run.scoring:
        raise ConfigError(f"--scoring: allowed: {', '.join(SCORINGS)} (comma-separated), got {','.join(run.scoring) or 'nothing'}")
    if not run.out_dir:
        cfg.run.out_dir = str(Path("runs") / f"finetune_{Path(cfg.model.name.rstrip('/')).name}_{optim.method}")


__all__ = ["FinetuneConfig", "FIELDS", "LIST_FIELDS", "RESUME_FREE", "LORA", "SCORINGS", "DEFAULT_TRAIN",
           "DEFAULT_EVAL", "RUN_OUTPUTS", "WEIGHT_PRECISIONS", "validate_options"]
