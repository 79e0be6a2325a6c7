"""A fine-tuning run on the Hugging Face ``Trainer``: config, run directory, training with exact
resume, per-task evaluation and the summary.

Outputs in ``RUN_DIR`` (as ``fullrank pretrain``): ``config.yaml``, ``metrics.jsonl`` (``train``
records per step, ``accuracy`` records per task and scoring), ``checkpoints/checkpoint-N/`` (the
Trainer's: model, optimizer, scheduler, RNG and data position), ``predictions.jsonl``,
``summary.json``, ``loss.png`` and ``hf_model/`` (the fine-tuned model, LoRA merged, and its tokenizer).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from .._quiet import no_hub_progress_bars
from ..config import save_yaml
from ..errors import ConfigError, TrainingError, first_line
from ..run_dir import remove_outputs
from ..train.metrics import MetricsLog, peak_memory
from ..train.models import enable_activation_checkpointing
from ..train.threads import choose_threads
from . import data as D
from .scoring import SCORINGS, accuracy, score_generations, score_likelihood

from .config import (  # noqa: F401 (FinetuneConfig and its tables are imported from here too)
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    FIELDS,
    LIST_FIELDS,
    LORA,
    RESUME_FREE,
    RUN_OUTPUTS,
    FinetuneConfig,
    validate_options,
)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """The option checks (``config.validate_options``), then what needs torch or the data: the device,
    the target patterns, the task files. One-line ConfigErrors naming the flag; fills derived defaults."""
    validate_options(cfg)
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but no CUDA device is available")
    for pattern in cfg.optim.target_modules:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"--target-modules: '{pattern}' is not a valid regular expression ({err})") from None
    D.check_tasks(cfg.data.train, Path(cfg.data.data_dir), "train", "--train")
    D.check_tasks(cfg.data.eval, Path(cfg.data.data_dir), "test", "--eval")
    return cfg


def build_config(values: dict) -> FinetuneConfig:
    return validate(FinetuneConfig.build(values, "fine-tuning options"))


def _target_spec(cfg: FinetuneConfig):
    return "all-linear" if cfg.optim.target_modules == ["all-linear"] else list(cfg.optim.target_modules)


# ----------------------------------------------------------------------------------------- run

def _training_args(cfg: FinetuneConfig, run_dir: Path):
    from transformers import TrainingArguments

    cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=cfg.data.micro_batch_size,
        gradient_accumulation_steps=cfg.data.batch_size // cfg.data.micro_batch_size, num_train_epochs=cfg.run.epochs,
        max_steps=cfg.run.max_steps if cfg.run.max_steps > 0 else -1, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type="linear", warmup_steps=cfg.optim.warmup_steps, max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=1, save_strategy="steps", save_steps=cfg.run.save_every or 10**9, save_total_limit=cfg.run.keep_checkpoints,
        report_to="none", seed=cfg.run.seed, data_seed=cfg.run.seed, use_cpu=not cuda, bf16=cfg.precision.bf16 and cuda,
        disable_tqdm=not cfg.run.progress, remove_unused_columns=False, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", save_only_model=False, eval_strategy="no",
    )


def _metrics_callback(log: MetricsLog):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Writes one ``train`` record per logged step to ``metrics.jsonl``; fails on a non-finite loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                raise TrainingError(f"step {state.global_step}: the training loss is {logs['loss']}; lower --lr or set --max-grad-norm")
            elapsed = time.perf_counter() - self.start
            record = {"type": "train", "step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                      "lr": logs.get("learning_rate"), "tokens": state.num_input_tokens_seen,
                      "tokens_per_s": (state.num_input_tokens_seen - self.start_tokens) / elapsed if elapsed else None}
            if logs.get("grad_norm") is not None:
                record["grad_norm"] = float(logs["grad_norm"])
            log.write(record)

    return MetricsCallback()


def latest_trainer_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    return found[-1][1] if found else None


def prepare_model(cfg: FinetuneConfig):
    """(model, tokenizer, optimizer (cls, kwargs)) for the config."""
    from .. import hf
    from .models import apply_lora, load_model

    model, tokenizer = load_model(cfg.model.name, cfg.model.tokenizer or None, cfg.run.seed, cfg.precision.dtype, cfg.run.progress)
    if cfg.precision.activation_checkpointing:
        enable_activation_checkpointing(model)
    precision = cfg.precision.engine_options()
    try:
        names = hf.target_module_names(model, _target_spec(cfg))
        if not names:
            raise ValueError(f"--target-modules: {','.join(cfg.optim.target_modules)} matches no nn.Linear module of the model")
        if cfg.optim.method == LORA:
            torch.manual_seed(cfg.run.seed)
            model = apply_lora(model, names, cfg.optim.rank, cfg.optim.lora_alpha, cfg.optim.lora_dropout)
            optimizer = hf.optimizer_cls_and_kwargs(model, "adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                                    **cfg.optim.optim_args, **precision)
        else:
            options = {**cfg.optim.optim_args, **precision}
            if cfg.optim.method != "adamw":
                options.setdefault("seed", cfg.run.seed)
            optimizer = hf.optimizer_cls_and_kwargs(
                model, cfg.optim.method, rank=cfg.optim.rank, target_modules=names, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                update_proj_gap=cfg.optim.update_proj_gap, scale=cfg.optim.scale, proj_type=cfg.optim.proj_type, **options)
    except (ValueError, TypeError) as err:
        message = first_line(err)
        if message.startswith("--"):
            raise ConfigError(message) from None
        raise cfg.precision.refusal(cfg.optim.method, err) from None
    return model, tokenizer, optimizer


def start_run_dir(cfg: FinetuneConfig, resume: bool) -> Path:
    run_dir = Path(cfg.run.out_dir)
    if resume:
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out-dir: '{run_dir}' exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not cfg.run.overwrite:
            raise ConfigError(f"--out-dir: run directory '{run_dir}' already exists and is not empty; "
                              f"pass --overwrite to replace its outputs or --resume {run_dir} to continue it")
        remove_outputs(run_dir, RUN_OUTPUTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")
    return run_dir


def resume_config(run_dir: str, overrides: dict) -> FinetuneConfig:
    """The saved config of ``run_dir``; only ``RESUME_FREE`` options may differ."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: '{run_dir}' is not a fine-tuning run directory (no config.yaml)")
    try:
        saved = FinetuneConfig.build(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, f"--resume {path}").flat()
    except (ConfigError, AttributeError, yaml.YAMLError):
        raise ConfigError(f"--resume: '{path}' is not a fullrank finetune config") from None
    for key, value in overrides.items():
        if key not in RESUME_FREE and key != "out_dir" and saved.get(key) != value:
            raise ConfigError(f"--resume: a resumed run keeps its config; drop --{key.replace('_', '-')} "
                              f"(saved {saved.get(key)!r}, given {value!r})")
    saved.update({k: v for k, v in overrides.items() if k in RESUME_FREE})
    return build_config(saved)


def evaluate(model, tokenizer, cfg: FinetuneConfig, log: MetricsLog | None, run_dir: Path | None) -> dict:
    """``{scoring: {task: accuracy}}`` on the test sets, plus ``counts``; predictions to predictions.jsonl."""
    encoder = D.PromptEncoder(tokenizer)
    max_length = getattr(model.config, "max_position_embeddings", None)
    results, counts, lines = {s: {} for s in cfg.run.scoring}, {}, []
    for task in cfg.data.eval:
        records = D.load_task(Path(cfg.data.data_dir), task, "test", cfg.data.eval_limit, cfg.run.seed)
        counts[task] = len(records)
        for scoring in cfg.run.scoring:
            if scoring == "generate":
                scored = score_generations(model, encoder, records, cfg.data.eval_batch_size, cfg.run.max_new_tokens, max_length,
                                           cfg.run.progress, desc=f"{task} generate")
            else:
                scored = score_likelihood(model, encoder, records, cfg.data.eval_batch_size, cfg.run.progress, desc=f"{task} likelihood")
            results[scoring][task] = accuracy(scored)
            if log is not None:
                log.write({"type": "accuracy", "task": task, "scoring": scoring, "accuracy": results[scoring][task], "examples": len(records)})
            for i, (record, r) in enumerate(zip(records, scored)):
                lines.append(json.dumps({"task": task, "scoring": scoring, "index": i, "answer": record["answer"], **r}))
    if run_dir is not None:
        (run_dir / "predictions.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"accuracy": results, "average": {s: sum(v.values()) / len(v) for s, v in results.items()}, "examples": counts}


def finetune(values: dict, resume: str | None = None) -> dict:
    """Run (or with ``resume`` continue) a fine-tuning run; returns the summary (also in summary.json)."""
    wall_start = time.perf_counter()
    cfg = resume_config(resume, values) if resume else build_config(values)
    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        threads, why = choose_threads(cfg.run.threads)
        torch.set_num_threads(threads)
        print(f"CPU threads: {threads} ({why}; --threads N sets it)", flush=True)
    elif cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    checkpoint = None
    if resume:
        checkpoint = latest_trainer_checkpoint(Path(resume))
        if checkpoint is None:
            raise ConfigError(f"--resume: '{resume}' holds no checkpoint (checkpoints/checkpoint-N)")
    model, tokenizer, optimizer = prepare_model(cfg)  # all input checked before the run directory is touched
    encoder = D.PromptEncoder(tokenizer)
    records = [r for task in cfg.data.train for r in D.load_task(Path(cfg.data.data_dir), task, "train", cfg.data.train_limit, cfg.run.seed)]
    examples, dropped = D.encode_dataset(records, encoder, cfg.data.cutoff_len)
    if not examples:
        raise ConfigError(f"--cutoff-len: all {len(records)} training examples are longer than {cfg.data.cutoff_len} tokens")
    run_dir = start_run_dir(cfg, resume is not None)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=int(checkpoint.name.split("-")[1]) if checkpoint else None)
    if resume:  # evaluation records of the finished session are written again below
        kept = [line for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if '"type": "accuracy"' not in line]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    if dropped:
        print(f"warning: dropped {dropped} of {len(records)} training examples longer than --cutoff-len {cfg.data.cutoff_len}", file=sys.stderr)
    summary = train_and_evaluate(cfg, model, tokenizer, optimizer, examples, run_dir, log, checkpoint)
    summary.update(train_examples=len(examples), dropped_examples=dropped, wall_time_s=time.perf_counter() - wall_start)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    from ..train.plot import plot_runs

    plot_runs([run_dir], run_dir / "loss.png", title=f"finetune {Path(cfg.model.name).name} {cfg.optim.method}")
    print(format_summary(summary), flush=True)
    return summary


def train_and_evaluate(cfg, model, tokenizer, optimizer, examples, run_dir, log, checkpoint) -> dict:
    from transformers import PrinterCallback, Trainer

    from .. import hf
    from ..optim.core.state_bytes import optimizer_state_bytes

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    trainer = Trainer(model=model, args=_training_args(cfg, run_dir), train_dataset=examples,
                      data_collator=D.PadCollator(tokenizer.pad_token_id), optimizer_cls_and_kwargs=optimizer,
                      callbacks=[_metrics_callback(log)])
    trainer.remove_callback(PrinterCallback)
    print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable; method {cfg.optim.method}"
          f"{'' if cfg.optim.method == 'adamw' else f' (rank {cfg.optim.rank})'}, {len(examples)} training examples, run dir {run_dir}", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RuntimeError as err:
        if type(err).__name__ == "NonFiniteGradientError":
            raise TrainingError(f"{first_line(err)}; lower --lr or set --max-grad-norm") from None
        raise
    trainer.save_state()
    state = trainer.state
    session_tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    runtime = result.metrics.get("train_runtime") or float("nan")
    opt = hf.unwrap_optimizer(trainer.optimizer)
    mem, kind = peak_memory(next(model.parameters()).device)
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    scores = evaluate(trainer.model, tokenizer, cfg, log, run_dir)
    if cfg.run.save_model:
        out = trainer.model.merge_and_unload() if cfg.optim.method == LORA else trainer.model
        with no_hub_progress_bars():
            out.save_pretrained(run_dir / "hf_model")
        tokenizer.save_pretrained(run_dir / "hf_model")
    return {
        "model": cfg.model.name, "method": cfg.optim.method, "rank": cfg.optim.rank, "target_modules": cfg.optim.target_modules,
        "parameters": n_params, "trainable_parameters": n_trainable, "train_tasks": cfg.data.train,
        "steps": state.global_step, "epochs": state.epoch, "tokens": state.num_input_tokens_seen,
        "final_train_loss": losses[-1] if losses else None, **scores,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "peak_memory_bytes": mem, "peak_memory_kind": kind,
        "tokens_per_s": session_tokens / runtime if runtime else None, "train_time_s": runtime,
        "device": str(next(model.parameters()).device), "run_dir": str(run_dir),
    }


def format_summary(s: dict) -> str:
    """Per-task accuracy table (one column per scoring) and the run's cost."""
    scorings = list(s["accuracy"])
    tasks = list(s["examples"])
    width = max(len(t) for t in [*tasks, "average", "task"])
    head = f"{'task':<{width}} | {'n':>5} | " + " | ".join(f"{x:>10}" for x in scorings)
    rows = [head, "-" * len(head)]
    rows += [f"{t:<{width}} | {s['examples'][t]:>5} | " + " | ".join(f"{100 * s['accuracy'][x][t]:>9.1f}%" for x in scorings) for t in tasks]
    rows.append(f"{'average':<{width}} | {'':>5} | " + " | ".join(f"{100 * s['average'][x]:>9.1f}%" for x in scorings))
    loss = f"{s['final_train_loss']:.4f}" if s.get("final_train_loss") is not None else "n/a"
    tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "n/a"
    rows += [
        "",
        f"method {s['method']}{'' if s['method'] == 'adamw' else ' (rank %d)' % s['rank']}: {s['steps']} steps, final train loss {loss}",
        f"optimizer state {s['optimizer_state_bytes'] / 2**20:.2f} MiB, peak memory {s['peak_memory_bytes'] / 2**20:.0f} MiB "
        f"({s['peak_memory_kind']}), {tps} tokens/s",
        f"run dir {s['run_dir']}",
    ]
    return "\n".join(rows)
