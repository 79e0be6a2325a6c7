"""Everything before the first step: the resolved config, input checks, the run directory, the
model, the optimizer, the schedule, the data streams, and the state restored from a checkpoint.

All user input is checked before the run directory is touched, so a bad flag never changes it.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from . import config as C
from .checkpoint import is_sharded, latest_checkpoint, load_checkpoint, set_rng_state
from .corpus import check_corpus, make_corpora
from .data import PackedStream, eval_blocks
from .distributed import DistEnv, all_gather_objects
from .errors import ConfigError
from .metrics import MetricsLog
from ..run_dir import remove_outputs
from .models import build_model, count_parameters, enable_activation_checkpointing, model_config, projected_linears
from .schedule import load_scheduler_state, make_scheduler
from .tokenizer import load_tokenizer

RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "rank.png", "checkpoints", "tensorboard",
               "hf_model")


def resolve_config(overrides: dict) -> tuple[C.TrainConfig, Path | None]:
    """The finalized config of a new run, or of a resumed one (checked against its checkpoint)."""
    if not overrides.get("resume"):
        return C.finalize(C.build(overrides)), None
    run_dir = Path(overrides["resume"])
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: run directory '{run_dir}' does not exist")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: '{run_dir}' was stopped before its first checkpoint, so there is nothing to "
                              f"resume; start it again with: fullrank pretrain --config {run_dir / 'config.yaml'} --overwrite")
        raise ConfigError(f"--resume: '{run_dir}' holds no checkpoint (checkpoints/step_*.pt)")
    if overrides.get("out_dir") and Path(overrides["out_dir"]).resolve() != run_dir.resolve():
        raise ConfigError(f"--out-dir: a resumed run continues in its own directory '{run_dir}'; drop --out-dir")
    state = load_checkpoint(ckpt, lazy=True)
    saved = C.finalize(C.from_dict(state["config"], f"checkpoint {ckpt}"))
    given = C.finalize(C.build({**saved.flat(), **overrides, "out_dir": str(run_dir)}))
    diffs = C.resume_mismatches(saved, given)
    if diffs:
        raise ConfigError(f"--resume: '{run_dir}' was trained with a different config: {'; '.join(diffs[:4])}")
    if "schedule_steps" not in overrides:  # keep the original schedule (an extended run goes on at the floor lr)
        given = given.replace(schedule_steps=saved.optim.schedule_steps or saved.run.max_steps)
    step = int(state["step"])
    if given.run.max_steps < step:
        raise ConfigError(f"--max-steps {given.run.max_steps} is below the {step} steps '{run_dir}' already trained; "
                          f"allowed: {step}.. (a larger value extends the run)")
    return given, ckpt


@dataclass
class Run:
    cfg: C.TrainConfig
    env: DistEnv
    run_dir: Path
    model: torch.nn.Module  # unwrapped (no DDP)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_stream: PackedStream
    val_blocks: torch.Tensor
    log: MetricsLog | None  # main process only
    n_params: int
    n_trainable: int
    start_step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds spent in training steps, over every session of the run
    wall_before: float = 0.0  # wall-clock seconds of the run's earlier sessions (up to the checkpoint resumed)
    wall_start: float = 0.0  # time.perf_counter() when the command started
    tokenizer: object = None  # TextTokenizer, saved with the exported Hugging Face model


def _warn(env: DistEnv):
    def warn(message: str) -> None:
        if env.main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    return warn


def use_tensorboard(cfg: C.TrainConfig) -> bool:
    """``--tensorboard`` as given, or on when the ``tensorboard`` package is installed."""
    import importlib.util

    installed = importlib.util.find_spec("tensorboard") is not None
    if cfg.run.tensorboard and not installed:
        raise ConfigError("--tensorboard: the 'tensorboard' package is not installed; "
                          "pip install 'fullrank[tensorboard]' or pass --no-tensorboard")
    return installed if cfg.run.tensorboard is None else cfg.run.tensorboard


def check_inputs(cfg: C.TrainConfig, env: DistEnv):
    """Model/rank/seq_len, tokenizer, corpora: (model config, linears, tokenizer, corpora, val blocks)."""
    use_tensorboard(cfg)
    if cfg.optim.layerwise and env.enabled and not cfg.run.fsdp:
        raise ConfigError("--layerwise: not supported with several processes under DDP (DDP averages the gradients "
                          "after the per-parameter hooks would step); add --fsdp, run on one process or drop --layerwise")
    mconfig = model_config(cfg.model.name)
    with torch.device("meta"):  # shapes only, no memory
        meta_model = LlamaForCausalLM(mconfig)
    linears = projected_linears(meta_model, cfg.optim.target_modules)
    C.validate_against_model(cfg, mconfig, linears)
    if cfg.optim.method not in C.LORA_METHODS:
        make_optimizer(cfg, meta_model)  # the engine checks its options (rank, gamma, ...) here
    del meta_model
    train_corpus, val_corpus = make_corpora(cfg.data.corpus, cfg.data.val_data, cfg.data.val_fraction)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    if tokenizer.vocab_size > mconfig.vocab_size:
        raise ConfigError(
            f"--tokenizer: '{cfg.model.tokenizer}' has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{mconfig.vocab_size}; use a tokenizer of at most {mconfig.vocab_size} tokens or a model config with a larger vocab_size"
        )
    check_corpus(train_corpus, "training")
    check_corpus(val_corpus, "validation")
    val = eval_blocks(val_corpus, tokenizer, cfg.data.seq_len, mconfig.vocab_size, cfg.data.eval_tokens, _warn(env))
    return mconfig, linears, tokenizer, train_corpus, val


def check_run_dir(cfg: C.TrainConfig) -> None:
    """Refuse to reuse a non-empty run directory unless ``--overwrite`` (checked by every process)."""
    run_dir = Path(cfg.run.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out-dir: '{run_dir}' exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        resumable = latest_checkpoint(run_dir) is not None
        raise ConfigError(
            f"--out-dir: run directory '{run_dir}' already exists and is not empty; pass --overwrite to replace its outputs"
            + (f" or --resume {run_dir} to continue it" if resumable else " (it holds no checkpoint to resume)")
        )


def prepare_run_dir(cfg: C.TrainConfig) -> Path:
    """Create the run directory (main process); with ``--overwrite`` delete the previous run's outputs."""
    run_dir = Path(cfg.run.out_dir)
    remove_outputs(run_dir, RUN_OUTPUTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save_yaml(cfg, run_dir / "config.yaml")
    return run_dir


def prepare_model(model: torch.nn.Module, cfg: C.TrainConfig) -> torch.nn.Module:
    """``--weights`` (bf16 casts the weights: no fp32 copy) and ``--activation-checkpointing``
    (transformers' gradient checkpointing, non-reentrant) applied to a freshly built model."""
    if cfg.precision.weights in ("bf16", "bf16-sr") and any(p.dtype != torch.bfloat16 for p in model.parameters()):
        model.to(torch.bfloat16)
    if cfg.precision.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def make_optimizer(cfg: C.TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The engine's optimizer for ``cfg.optim.method`` (AdamW on the trainable parameters for LoRA/ReLoRA),
    stepped per parameter during backward with ``--layerwise``. Under ``--fsdp`` a parameter's hook
    fires once per reduce-scatter, which the loop runs on the last micro-batch only: it steps at
    every hook (``accumulation_steps=1``)."""
    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)

    optimizer = _engine_optimizer(cfg, model)
    if not cfg.optim.layerwise:
        return optimizer
    try:
        accumulation = 1 if cfg.run.fsdp else cfg.data.grad_accum
        layerwise = fullrank.LayerwiseOptimizer(model, optimizer, accumulation_steps=accumulation)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--layerwise: method '{cfg.optim.method}' cannot run layer-wise: {str(err).splitlines()[0]}") from None
    if next(model.parameters()).device.type == "meta":  # the option check of check_inputs: no hooks left on a throw-away model
        layerwise.remove()
    return layerwise


def _engine_optimizer(cfg: C.TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)

    hyper = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    options = {**cfg.optim.optim_args, **cfg.precision.engine_options()}
    # layer-wise mode needs the engine; on groups without a rank it is torch.optim.AdamW's update
    adamw = (lambda groups, **kw: fullrank.SubspaceAdamW(groups, **kw)) if cfg.optim.layerwise else (
        lambda groups, **kw: fullrank.make_optimizer("adamw", groups, **kw))
    try:
        if cfg.optim.method in C.LORA_METHODS:
            return adamw(plain, **hyper, **cfg.precision.engine_options())
        if cfg.optim.method == "adamw":
            return adamw(plain, **hyper, **options)
        if cfg.optim.method not in fullrank.PRESETS:  # adamw8bit and other plain optimizers of make_optimizer
            return fullrank.make_optimizer(cfg.optim.method, plain, **hyper, **options)
        groups = fullrank.param_groups(
            model, rank=cfg.optim.rank, target_modules=tuple(cfg.optim.target_modules),
            update_proj_gap=cfg.optim.update_proj_gap, scale=cfg.optim.scale, proj_type=cfg.optim.proj_type,
        )
        options.setdefault("seed", cfg.run.seed)
        return fullrank.make_optimizer(cfg.optim.method, groups, **hyper, **options)
    except (ValueError, TypeError, ImportError, NotImplementedError) as err:
        raise cfg.precision.refusal(cfg.optim.method, err) from None


def check_global_batch(state: dict, cfg: C.TrainConfig, env: DistEnv) -> None:
    """A sharded run resumes on any number of processes that keeps its global batch."""
    saved = C.from_dict(state["config"], "checkpoint")
    saved_batch = saved.data.batch_size * len(state["rng"])
    if cfg.data.batch_size * env.world_size != saved_batch:
        allowed = f"{saved_batch // env.world_size}" if saved_batch % env.world_size == 0 else "none (it does not divide)"
        raise ConfigError(f"--batch-size: the checkpoint's global batch is {saved_batch} sequences ({saved.data.batch_size} x "
                          f"{len(state['rng'])} processes); with {env.world_size} processes --batch-size must be {allowed}")


def build_run(cfg: C.TrainConfig, env: DistEnv, ckpt_path: Path | None) -> Run:
    mconfig, linears, tokenizer, train_corpus, val = check_inputs(cfg, env)
    state = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    run_dir = Path(cfg.run.out_dir)
    if state is None:
        check_run_dir(cfg)
        all_gather_objects(None, env)  # every process has checked before the main one writes
        if env.main:
            prepare_run_dir(cfg)

    model = prepare_model(build_model(mconfig, cfg.run.seed), cfg)
    if cfg.optim.method in C.LORA_METHODS:
        from .lora import (
            apply_lora,  # peft is imported only when needed (it is slow to import)
        )

        model = apply_lora(model, [name for name, _ in linears], cfg.optim.rank, cfg.optim.lora_alpha, cfg.optim.lora_dropout)
    model.to(env.device)
    n_params, n_trainable = count_parameters(model)
    if cfg.run.fsdp:
        from .fsdp import shard_model
        shard_model(model, env.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(optimizer, cfg)
    run = Run(cfg, env, run_dir, model, optimizer, scheduler, None, val, None, n_params, n_trainable, tokenizer=tokenizer)
    if state is not None:
        rngs = state["rng"]
        if is_sharded(ckpt_path):
            if not cfg.run.fsdp:
                raise ConfigError(f"--resume: '{ckpt_path}' was written with --fsdp; resume with --fsdp")
            check_global_batch(state, cfg, env)
            from . import fsdp
            fsdp.load(ckpt_path, model, optimizer)
        else:
            if cfg.run.fsdp:
                raise ConfigError(f"--resume: '{ckpt_path}' was written without --fsdp; resume without --fsdp")
            if len(rngs) != env.world_size:
                raise ConfigError(f"--resume: the checkpoint was written by {len(rngs)} processes, this run has {env.world_size}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        load_scheduler_state(scheduler, state["scheduler"], cfg)
        # on another number of processes (--fsdp) each takes the RNG state of its rank modulo the saved ones
        # (a LLaMA draws no random numbers after its initialisation: the losses do not depend on it)
        set_rng_state(rngs[env.rank % len(rngs)], env.device)
        run.start_step, run.tokens, run.train_time = int(state["step"]), int(state["tokens"]), float(state["train_time"])
        run.wall_before = float(state.get("wall_time", run.train_time))  # (checkpoints without it: a lower bound)
    run.train_stream = PackedStream(
        train_corpus, tokenizer, cfg.data.seq_len, mconfig.vocab_size, allow_repeat=cfg.data.allow_repeat,
        state=state["data"] if state is not None else None, warn=_warn(env),
    )
    if env.main:
        run.log = MetricsLog(run_dir / "metrics.jsonl", resume_step=run.start_step if state is not None else None,
                             tensorboard_dir=run_dir / "tensorboard" if use_tensorboard(cfg) else None)
    all_gather_objects(None, env)  # every process waits for the run directory
    return run
