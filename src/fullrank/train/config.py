"""``fullrank pretrain``'s configuration: five sections (``fullrank.config``), filled from defaults,
then a YAML file, then flags.

Every field is a flag (``rank`` → ``--rank``) and a key of the YAML file given with ``--config``, flat
(``rank: 128``) or by section (``optim: {rank: 128}``). Relative paths in a YAML file resolve against
the current directory (the directory ``fullrank`` is started from), exactly like paths given as flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (  # noqa: F401 (the shared names, where pretrain's code imports them)
    LORA_METHODS,
    OWN_FLAG_OPTIONS,
    STATE_PRECISIONS,
    WEIGHT_PRECISIONS,
    Config,
    Optim,
    Precision,
    Run,
    check,
    did_you_mean,
    engine_methods,
    method_options,
    option,
    optim_help,
    parse_key_value,
    save_yaml,
)
from ..config import coerce as _coerce
from ..config import load_yaml as _load_yaml
from ..errors import ConfigError

RECIPES = {  # batch_size, grad_accum, eval_tokens
    "paper": (64, 8, 10_000_000),
    "cpu": (4, 1, 16_384),
}


def all_methods() -> tuple[str, ...]:
    return (*engine_methods(), *LORA_METHODS)


@dataclass
class Model:
    """The model and its tokenizer."""

    name: str = option("llama_60m", "model preset (llama_tiny, llama_20m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b, llama_13b, llama_70b) or a LlamaConfig .json file", flag="model")
    tokenizer: str = option("t5-base", "hub name (needs internet), tokenizer folder, tokenizer.json or SentencePiece .model file")


@dataclass
class Data:
    """The corpora, how they are cut into sequences, and how many make a step and an evaluation."""

    corpus: str = option("c4", "'c4' (streams allenai/c4 'en' from the Hugging Face Hub: needs internet) or a local .txt/.jsonl/.json.gz/.jsonl.gz/.parquet file or folder", flag="data")
    val_data: str | None = option(None, "validation corpus (same formats); default: the c4 validation split, or every k-th document of --data with k = 1/val_fraction")
    val_fraction: float = option(0.01, "fraction of the documents of --data held out for validation when --val-data is not given")
    allow_repeat: bool = option(False, "start the training corpus again when it runs out (else the run stops early with a warning)")
    seq_len: int = option(256, "tokens per sequence (documents are packed, EOS between them)")
    recipe: str = option("auto", "defaults of batch_size, grad_accum and eval_tokens: 'paper' (64 x 8 sequences = 131K tokens per step, 10M eval tokens), 'cpu' (4 x 1 = 1K tokens per step, 16K eval tokens) or 'auto' (cpu on a CPU, paper on a GPU); explicit values win")
    batch_size: int | None = option(None, "sequences per micro-batch per process; default from --recipe (paper 64, cpu 4)")
    grad_accum: int | None = option(None, "micro-batches per optimizer step; tokens/step = batch_size x grad_accum x processes x seq_len; default from --recipe (paper 8: 512 x 256 = 131K tokens, cpu 1)")
    eval_tokens: int | None = option(None, "validation tokens per evaluation; default from --recipe (paper: 10M as GaLore, cpu: 16,384)")


@dataclass
class PretrainOptim(Optim):
    """The optimizer, its schedule and pre-training's extras (clipping, layer-wise updates, ReLoRA)."""

    method: str = option("fira", "optimizer method: any fullrank.make_optimizer name (adamw, galore, fira and its ablations, adarankgrad, apollo, ...: --help-optim lists them with their options), lora or relora")
    rank: int | None = option(None, "rank r of the projection (or of LoRA); default: paper Table 2 (60m:128, 130m:256, 350m:256, 1b:512, 7b:1024, tiny presets d_model/4)")
    scale: float | None = option(None, "α, the scale of the projected update (galore/fira); default 0.25, 0.0625 for llama_1b and larger")
    lr: float | None = option(None, "peak learning rate; default 1e-2 for galore/fira methods, 1e-3 for adamw/lora/relora")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    eps: float = option(1e-8, "Adam epsilon")
    warmup_ratio: float = option(0.1, "fraction of the schedule's steps of linear lr warm-up")
    min_lr_ratio: float = option(0.1, "cosine decay ends at this fraction of the peak lr")
    schedule_steps: int | None = option(None, "steps of the warm-up + cosine lr schedule; default max_steps. A run extended with --resume RUN --max-steps N keeps its original schedule (the added steps run at the floor min_lr_ratio x lr); --schedule-steps N there re-plans it")
    grad_clip: float = option(0.0, "clip the global gradient norm to this value (0 disables)")
    layerwise: bool = option(False, "update each weight during backward and free its gradient at once (GaLore's layer-wise mode): one gradient alive at a time; needs --grad-clip 0, and one process or --fsdp (not DDP)")
    relora_every: int = option(1000, "ReLoRA: merge the adapters into the weights and restart them every N steps")
    relora_warmup: int = option(50, "ReLoRA: steps of lr re-warm-up after each restart")
    relora_prune: float = option(0.999, "ReLoRA: fraction of the LoRA parameters' Adam moments zeroed at each restart (smallest first moments first); 1.0 zeroes all")


@dataclass
class PretrainRun(Run):
    """Steps, evaluation, checkpoints, the run directory, processes and instruments."""

    max_steps: int = option(10000, "optimizer steps (paper: 10K for 60M, 20K for 130M, 60K for 350M, 100K for 1B); a resumed run may be given more steps to extend it")
    eval_every: int = option(1000, "evaluate every N steps (0: only at the end)")
    resume: str | None = option(None, "continue the run in this run directory from its latest checkpoint")
    fsdp: bool = option(False, "shard the model, its gradients and the optimizer state over the processes with FSDP2 (run under torchrun; checkpoints through torch.distributed.checkpoint, resumable on another number of processes at the same global batch); full-parameter methods only, not --probe; with --layerwise each weight's shard is updated as soon as it is reduce-scattered")
    probe: str = option("", "instruments to carry, comma-separated: scaling (scaling-factor probe: scaling_probe.jsonl), spikes (loss, gradient and residual norms per step: spikes.jsonl, spike metric in summary.json); empty: none")
    probe_ranks: list = option([], "ranks of the scaling probe's shadow low-rank Adam, comma-separated (default: d/16 and d/2 of the projected matrices)")
    tensorboard: bool | None = option(None, "write TensorBoard event files to RUN_DIR/tensorboard (needs the 'tensorboard' package: pip install fullrank[tensorboard]); default: on when it is installed")


@dataclass
class TrainConfig(Config):
    """Everything a pre-training run needs, by section. ``None`` means: derive it (``finalize``)."""

    model: Model = dataclasses.field(default_factory=Model)
    data: Data = dataclasses.field(default_factory=Data)
    optim: PretrainOptim = dataclasses.field(default_factory=PretrainOptim)
    precision: Precision = dataclasses.field(default_factory=Precision)
    run: PretrainRun = dataclasses.field(default_factory=PretrainRun)


FIELDS = {name: f for name, (_, f) in TrainConfig.fields().items()}
# Fields that may differ between a run and its resumption: they change no trained number.
RESUME_FREE = ("activation_checkpointing", "probe", "probe_ranks", "resume", "overwrite", "out_dir", "eval_every",
               "save_every", "keep_checkpoints", "device", "threads", "progress", "tensorboard", "recipe", "max_steps",
               "schedule_steps")


def coerce(name: str, value: Any, source: str) -> Any:
    """Check (and convert) one value of ``fullrank pretrain``'s flat key ``name`` (``source``: where it came from)."""
    return _coerce(TrainConfig, name, value, source)


def load_yaml(path: str) -> dict:
    """The flat values of a YAML config file of ``fullrank pretrain``, each type-checked."""
    return _load_yaml(TrainConfig, path)


def build(overrides: dict) -> TrainConfig:
    """A ``TrainConfig`` from defaults and ``overrides`` (flat keys or sections, type-checked)."""
    return TrainConfig.build(overrides, "values")


def to_dict(cfg: TrainConfig) -> dict:
    return cfg.to_dict()


def from_dict(data: dict, source: str) -> TrainConfig:
    """A saved config: by section, or flat as checkpoints of earlier versions hold it."""
    return TrainConfig.build(data, source)


def _is_local(path: str) -> bool:
    return Path(path).exists()


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Fill the derived defaults, resolve local paths to absolute ones and check the ranges.

    Model-dependent checks (rank against the projected shapes, seq_len against the positions) need
    the model config and are in ``validate_against_model``.
    """
    from .models import default_rank, default_scale, model_config

    validate_ranges(cfg)
    changes: dict[str, Any] = {}
    recipe = RECIPES[resolved_recipe(cfg)]
    for name, value in zip(("batch_size", "grad_accum", "eval_tokens"), recipe):
        if cfg.get(name) is None:
            changes[name] = value
    if cfg.optim.rank is None:
        changes["rank"] = default_rank(cfg.model.name, model_config(cfg.model.name))
    if cfg.optim.lr is None:
        changes["lr"] = 1e-3 if cfg.optim.method in ("adamw", *LORA_METHODS) else 1e-2
    if cfg.optim.scale is None:
        changes["scale"] = default_scale(cfg.model.name)
    if cfg.run.out_dir is None:
        changes["out_dir"] = cfg.run.resume or str(Path("runs") / f"{Path(cfg.model.name).stem}_{cfg.optim.method}")
    for name in ("data", "val_data", "tokenizer"):
        value = cfg.get(name)
        if value is not None and value != "c4" and _is_local(value):
            changes[name] = str(Path(value).resolve())
    if cfg.model.name.endswith(".json") and _is_local(cfg.model.name):
        changes["model"] = str(Path(cfg.model.name).resolve())
    cfg = cfg.replace(**changes)
    return cfg.replace(out_dir=str(Path(cfg.run.out_dir).resolve()),
                       resume=str(Path(cfg.run.resume).resolve()) if cfg.run.resume else None)


def resolved_recipe(cfg: TrainConfig) -> str:
    """'paper' or 'cpu': ``--recipe auto`` is 'cpu' unless the run goes to a GPU."""
    if cfg.data.recipe != "auto":
        return cfg.data.recipe
    if cfg.run.device == "auto":
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    return "cpu" if cfg.run.device == "cpu" else "paper"


def validate_ranges(cfg: TrainConfig) -> None:
    """Names and numeric ranges that need no model."""
    data, optim, run = cfg.data, cfg.optim, cfg.run
    optim.validate(all_methods())
    cfg.precision.validate()
    run.validate()
    if data.recipe not in ("auto", *RECIPES):
        raise ConfigError(f"--recipe: unknown recipe '{data.recipe}'{did_you_mean(data.recipe, ('auto', *RECIPES))}; "
                          f"allowed: auto, {', '.join(RECIPES)}")
    for name in ("max_steps", "batch_size", "grad_accum", "relora_every", "eval_tokens", "schedule_steps"):
        if cfg.get(name) is not None:
            check(name, cfg.get(name), 1, integer=True)
    for name in ("eval_every", "relora_warmup"):
        check(name, cfg.get(name), 0, integer=True)
    check("seq_len", data.seq_len, 2, integer=True)
    for name in ("eps", "grad_clip"):
        check(name, cfg.get(name), 0.0)
    for name in ("beta1", "beta2"):
        check(name, cfg.get(name), 0.0, 1.0, high_open=True)
    check("warmup_ratio", optim.warmup_ratio, 0.0, 1.0, high_open=True)
    check("min_lr_ratio", optim.min_lr_ratio, 0.0, 1.0)
    check("val_fraction", data.val_fraction, 0.0, 0.5, low_open=True)
    check("relora_prune", optim.relora_prune, 0.0, 1.0)
    if optim.layerwise and optim.grad_clip > 0:
        raise ConfigError("--layerwise updates each weight during backward, before the global gradient norm exists: "
                          "--grad-clip must be 0 with --layerwise")
    if run.fsdp:
        if optim.method in LORA_METHODS:
            raise ConfigError(f"--fsdp: method '{optim.method}' trains LoRA adapters; --fsdp supports the full-parameter "
                              "methods (adamw and the fullrank presets)")
        if run.probe:
            raise ConfigError("--probe: the instruments read whole gradients on one process; not available with --fsdp")


def validate_against_model(cfg: TrainConfig, model_config, linears: list[tuple[str, tuple[int, int]]]) -> None:
    """seq_len against the positions, rank against the smallest projected matrix, targets present."""
    max_pos = model_config.max_position_embeddings
    if cfg.data.seq_len > max_pos:
        raise ConfigError(f"--seq-len {cfg.data.seq_len} exceeds the model's max_position_embeddings; allowed: 2..{max_pos}")
    if cfg.optim.method == "adamw":
        return
    if not linears:
        raise ConfigError(f"--target-modules {','.join(cfg.optim.target_modules)} matches no nn.Linear of the model; "
                          "use e.g. self_attn,mlp")
    name, shape = min(linears, key=lambda item: min(item[1]))
    smallest = min(shape)
    if cfg.optim.rank > smallest:
        raise ConfigError(
            f"--rank {cfg.optim.rank} is larger than the smallest projected dimension ({name}: {shape[0]}x{shape[1]}); "
            f"allowed: 1..{smallest}"
        )


def resume_mismatches(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """'key: saved vs given' for every field that changes training."""
    out = []
    for name in FIELDS:
        if name in RESUME_FREE or (name == "batch_size" and saved.run.fsdp and given.run.fsdp):
            continue  # (FSDP may resume on another number of processes: the global batch is checked there)
        a, b = saved.get(name), given.get(name)
        if a != b:
            out.append(f"{name}={a!r} (saved) vs {b!r} (given)")
    return out
