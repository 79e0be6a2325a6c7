"""The pre-training loop (nanoGPT-style): micro-batches with gradient accumulation, optional global
gradient clipping, one optimizer and scheduler step, logging, evaluation and checkpoints.

``pretrain(overrides)`` runs a whole run from a dict of config values and returns its summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import config as C
from .checkpoint import (
    FORMAT_VERSION,
    checkpoint_dir,
    latest_checkpoint,
    prune_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_hf_model,
)
from .data import CorpusExhausted, Prefetcher
from .distributed import DistEnv, all_gather_objects, all_reduce_sum, cleanup, setup
from .errors import TrainingError
from .fsdp import gradient_sync as fsdp_sync
from .metrics import (
    RankTracker,
    format_duration,
    format_summary,
    memory_comparison,
    peak_memory,
    ppl,
    read_metrics,
)
from .plot import plot_ranks, plot_runs, ranks_changed
from .setup import Run, build_run, resolve_config
from .threads import choose_threads


def autocast(env: DistEnv):
    """bf16 autocast on CUDA, plain fp32 on CPU."""
    if env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean next-token cross-entropy over the fixed validation blocks (split across processes)."""
    model, env, bs = run.model, run.env, run.cfg.data.batch_size
    model.eval()
    mine = run.val_blocks[env.rank::env.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for i in range(0, len(mine), bs):
        x = mine[i:i + bs].to(env.device)
        with autocast(env):
            loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens
        total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=env.device)])
    all_reduce_sum(total, env)
    model.train()
    return (total[0] / total[1]).item()


def save(run: Run, step: int, data_state: dict, rng: dict | None = None) -> None:
    """Checkpoint after ``step`` optimizer steps (written by the main process); ``rng``: the RNG
    state to store (default: the current one)."""
    rngs = all_gather_objects(rng if rng is not None else rng_state(run.env.device), run.env)
    meta = {"step": step, "tokens": run.tokens, "train_time": run.train_time, "wall_time": wall_time(run),
            "config": C.to_dict(run.cfg),
            "scheduler": run.scheduler.state_dict(), "data": data_state, "rng": rngs}
    if run.cfg.run.fsdp:  # every process writes its shards (fsdp.py); meta.pt holds the rest
        from . import fsdp
        fsdp.save(checkpoint_dir(run.run_dir) / f"step_{step:07d}", run.model, run.optimizer,
                  {**meta, "format_version": FORMAT_VERSION}, run.env.main)
        if run.env.main:
            prune_checkpoints(run.run_dir, run.cfg.run.keep_checkpoints)
    elif run.env.main:
        payload = {**meta, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
        save_checkpoint(run.run_dir, step, payload, run.cfg.run.keep_checkpoints)
    all_gather_objects(None, run.env)


def wall_time(run: Run) -> float:
    """Wall-clock seconds of the run so far: its earlier sessions and this one."""
    return run.wall_before + time.perf_counter() - run.wall_start


class Interrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C; the message says what was saved and how to go on."""


STOP_MESSAGE = "Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)"


class StopFlag:
    """Ctrl-C handling: the first press asks the loop to stop and save after the current step (and
    says so at once); a second press stops at once, except inside ``critical()`` sections (the
    optimizer update and its bookkeeping), where it waits for the section to end, so the model,
    optimizer and data position are always those of a completed step when it stops."""

    def __init__(self, announce):
        self.requested = False
        self._announce = announce
        self._previous = None
        self._critical = 0
        self._abort_pending = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested = True
            self._announce(STOP_MESSAGE)
        elif self._critical:
            self._abort_pending = True
        else:
            raise KeyboardInterrupt("second Ctrl-C")

    @contextlib.contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._abort_pending and not self._critical:
            self._abort_pending = False
            raise KeyboardInterrupt("second Ctrl-C")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def abort(run: Run, done: int, data_state: dict, rng: dict) -> Interrupted:
    """After a second Ctrl-C: save the last completed step (one process) and say how to go on."""
    run.optimizer.zero_grad(set_to_none=True)
    run.model.train()
    where = f"stopped at once by a second Ctrl-C during step {done + 1}"
    if run.env.world_size == 1:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut this save short
        save(run, done, data_state, rng)
        return Interrupted(f"{where}: saved the last completed step {done}; continue with: fullrank pretrain --resume {run.run_dir}")
    return Interrupted(f"{where}: nothing saved (a multi-process run saves only between steps); {restart_hint(run.run_dir)}")


def restart_hint(run_dir) -> str:
    """What to run to go on with ``run_dir``: resume its latest checkpoint, or start it again."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return f"continue from its latest checkpoint ({ckpt.name}) with: fullrank pretrain --resume {run_dir}"
    return f"it holds no checkpoint; start it again with: fullrank pretrain --config {run_dir}/config.yaml --overwrite"


def accumulate_gradients(run: Run, ddp: torch.nn.Module, prefetch: Prefetcher) -> tuple[torch.Tensor, dict]:
    """Forward and backward over ``grad_accum`` micro-batches (DDP all-reduces on the last one only).

    Every process draws the same global micro-batch and keeps its own rows, so N processes see
    exactly the sequences one process would with an N times larger batch. Returns the summed loss
    and the data position after the step; raises ``CorpusExhausted`` when the corpus runs out.
    """
    cfg, env = run.cfg, run.env
    rows = slice(env.rank * cfg.data.batch_size, (env.rank + 1) * cfg.data.batch_size)
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(cfg.data.grad_accum):
        batch, state = prefetch.get()
        x = batch[rows].to(env.device, non_blocking=True)
        # FSDP2 reduce-scatters (and a layer-wise step runs) on the last micro-batch only, on one process too
        sync = micro == cfg.data.grad_accum - 1 or not (env.enabled or cfg.run.fsdp)
        if cfg.run.fsdp:
            context = fsdp_sync(ddp, sync)
        else:
            context = contextlib.nullcontext() if sync else ddp.no_sync()
        with context:
            with autocast(env):
                loss = ddp(input_ids=x, labels=x).loss
            (loss / cfg.data.grad_accum).backward()
        loss_sum += loss.detach()
    return loss_sum, state


def optimizer_step(run: Run, params: list[torch.Tensor], step: int) -> tuple[float, float | None]:
    """Optional global clipping, the optimizer and scheduler steps; returns (lr used, grad norm)."""
    cfg, opt = run.cfg, run.optimizer
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip).item() if cfg.optim.grad_clip > 0 else None
    lr = opt.param_groups[0]["lr"]
    probes = getattr(run, "probes", None)
    if probes is not None:  # the --probe instruments: the gradients are final here
        probes.before_step(step)
    try:
        opt.step()
    except RuntimeError as err:
        if type(err).__name__ == "NonFiniteGradientError":
            raise TrainingError(f"step {step + 1}: {err}; lower --lr, set --grad-clip or pass --optim-arg nonfinite=skip") from None
        raise
    run.scheduler.step()
    opt.zero_grad(set_to_none=True)
    return lr, grad_norm


def train(run: Run) -> dict:
    """Steps ``start_step`` .. ``max_steps`` (or until the corpus runs out); returns the summary."""
    cfg, env = run.cfg, run.env
    if cfg.optim.method == "relora":
        from .lora import relora_restart
    if env.enabled and not cfg.run.fsdp:
        ddp = DistributedDataParallel(run.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    else:
        ddp = run.model
    params = [p for p in run.model.parameters() if p.requires_grad]
    tokens_per_step = cfg.data.batch_size * cfg.data.grad_accum * env.world_size * cfg.data.seq_len
    data_state = run.train_stream.state_dict()  # before the prefetch thread moves the stream on
    prefetch = Prefetcher(run.train_stream, cfg.data.batch_size * env.world_size)
    bar = tqdm(total=cfg.run.max_steps, initial=run.start_step, desc=cfg.optim.method, unit="step",
               disable=not (cfg.run.progress and env.main), dynamic_ncols=True, file=sys.stderr)
    ranks = RankTracker(run.optimizer)
    from .probes import loop_probes, probe_summary  # the --probe instruments
    run.probes = loop_probes(cfg, run.model, run.optimizer, run.run_dir) if env.main else None
    session_tokens, session_time, session_steps = 0, 0.0, 0
    last_eval, stopped_early, done = None, False, run.start_step
    step_rng = rng_state(env.device)
    announce = (lambda message: tqdm.write(message, file=sys.stderr)) if env.main else (lambda message: None)
    with StopFlag(announce) as stop, contextlib.closing(prefetch), bar:
        if evaluation_missing(run):  # an interrupt cut the evaluation of the resumed step short
            last_eval = (run.start_step, evaluate(run))
            log_eval(run, *last_eval)
        for step in range(run.start_step, cfg.run.max_steps):
            t0 = time.perf_counter()
            try:
                if cfg.optim.method == "relora" and step > 0 and step % cfg.optim.relora_every == 0:
                    with stop.critical():
                        relora_restart(run.model, run.optimizer, cfg.optim.relora_prune)
                try:
                    loss_sum, state = accumulate_gradients(run, ddp, prefetch)
                except CorpusExhausted as err:
                    run.optimizer.zero_grad(set_to_none=True)
                    stopped_early = True
                    if env.main:
                        tqdm.write(f"warning: {err} after {step} steps; stopping early (pass --allow-repeat to repeat it)", file=sys.stderr)
                    break
                with stop.critical():
                    lr, grad_norm = optimizer_step(run, params, step)
                    done, data_state = step + 1, state
                    # one reduction for the logged loss and for a stop request (Ctrl-C) on any process
                    shared = all_reduce_sum(torch.stack([loss_sum / cfg.data.grad_accum, torch.tensor(float(stop.requested), device=env.device)]), env)
                    loss, interrupted = shared[0].item() / env.world_size, shared[1].item() > 0
                    if not math.isfinite(loss):
                        raise TrainingError(f"step {done}: the training loss is {loss}; lower --lr or set --grad-clip")
                    dt = time.perf_counter() - t0
                    run.tokens, run.train_time = run.tokens + tokens_per_step, run.train_time + dt
                    session_tokens, session_time, session_steps = session_tokens + tokens_per_step, session_time + dt, session_steps + 1
                    step_rng = rng_state(env.device)
                    if env.main:
                        record = {"type": "train", "step": done, "tokens": run.tokens, "loss": loss, "ppl": ppl(loss),
                                  "lr": lr, "tokens_per_s": session_tokens / session_time, "step_time_s": dt}
                        if grad_norm is not None:
                            record["grad_norm"] = grad_norm
                        record.update(ranks.fields())
                        run.log.write(record)
                        if run.probes is not None:
                            run.probes.after_step(step, loss)
                        bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{ppl(loss):.1f}", lr=f"{lr:.2e}",
                                        tok_s=f"{session_tokens / session_time:,.0f}", refresh=False)
                        bar.update(1)
                        if session_steps == ETA_AFTER_STEPS and done < cfg.run.max_steps:
                            tqdm.write(eta_line(session_time / session_steps, cfg.run.max_steps - done), file=sys.stderr)
                    if interrupted:
                        save(run, done, data_state)
                        raise Interrupted(f"interrupted: checkpoint saved after step {done}; continue with: fullrank pretrain --resume {run.run_dir}")
                evaluated = is_eval_step(cfg, done)
                if evaluated:
                    last_eval = (done, evaluate(run))
                    log_eval(run, *last_eval)
                saved = (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.max_steps
                if saved:
                    with stop.critical():
                        save(run, done, data_state)
                if evaluated and done < cfg.run.max_steps and requested_anywhere(stop, env):  # Ctrl-C during the evaluation
                    with stop.critical():
                        if not saved:
                            save(run, done, data_state)
                    raise Interrupted(f"interrupted: checkpoint saved after step {done}; continue with: fullrank pretrain --resume {run.run_dir}")
            except Interrupted:
                raise
            except KeyboardInterrupt:
                raise abort(run, done, data_state, step_rng) from None
    if stopped_early and done > run.start_step:
        save(run, done, data_state)
    if last_eval is None or last_eval[0] != done:
        last_eval = (done, evaluate(run))
        log_eval(run, *last_eval)
    summary = summarize(run, done, last_eval[1], session_tokens / session_time if session_time else 0.0, stopped_early)
    if run.probes is not None:
        run.probes.close()
        summary.update(probe_summary(run.run_dir))
    return summary


ETA_AFTER_STEPS = 3


def is_eval_step(cfg: C.TrainConfig, step: int) -> bool:
    return bool(cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.run.max_steps


def requested_anywhere(stop: StopFlag, env) -> bool:
    """Whether Ctrl-C was pressed on any process (one all-reduce)."""
    flag = torch.tensor(float(stop.requested), device=env.device)
    return all_reduce_sum(flag, env).item() > 0


def evaluation_missing(run: Run) -> bool:
    """Whether the resumed step is an evaluation step whose evaluation is not in ``metrics.jsonl`` (the
    same answer on every process)."""
    step = run.start_step
    missing = False
    if run.env.main and step and is_eval_step(run.cfg, step):
        missing = not any(r.get("type") == "eval" and r.get("step") == step for r in read_metrics(run.log.path))
    return bool(all_gather_objects(missing, run.env)[0])


def eta_line(seconds_per_step: float, remaining: int) -> str:
    return (f"timing: {seconds_per_step:.2f} s per step over the first {ETA_AFTER_STEPS} steps; "
            f"about {format_duration(seconds_per_step * remaining)} for the remaining {remaining} steps (evaluations extra)")


def log_eval(run: Run, step: int, loss: float) -> None:
    if run.env.main:
        run.log.write({"type": "eval", "step": step, "tokens": run.tokens, "val_loss": loss, "val_ppl": ppl(loss)})
        tqdm.write(f"step {step}: val loss {loss:.4f}, val ppl {ppl(loss):.2f}", file=sys.stderr)


def summarize(run: Run, step: int, val_loss: float, tokens_per_s: float, stopped_early: bool) -> dict:
    from ..optim.core.state_bytes import optimizer_state_bytes, projected_state_bytes

    mem, kind = peak_memory(run.env.device)
    return {
        "model": run.cfg.model.name, "method": run.cfg.optim.method, "rank": run.cfg.optim.rank,
        "parameters": run.n_params, "trainable_parameters": run.n_trainable,
        "steps": step, "tokens": run.tokens, "final_val_loss": val_loss, "final_val_ppl": ppl(val_loss),
        "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
        "projected_state_bytes": projected_state_bytes(run.optimizer),
        "memory": memory_comparison(run.model, run.optimizer, run.cfg.optim.target_modules),
        "final_ranks": final_ranks(run.optimizer),
        "peak_memory_bytes": mem, "peak_memory_kind": kind, "tokens_per_s": tokens_per_s,
        "train_time_s": run.train_time, "wall_time_s": wall_time(run), "threads": run.cfg.run.threads or None,
        "world_size": run.env.world_size, "device": str(run.env.device), "stopped_early": stopped_early,
        "run_dir": str(run.run_dir),
    }


def final_ranks(optimizer) -> dict | None:
    """min/median/max/mean of the projected matrices' ranks at the end (None without a subspace optimizer)."""
    if not hasattr(optimizer, "rank_summary"):
        return None
    summary = optimizer.rank_summary()
    return None if summary["min"] is None else {k: summary[k] for k in ("min", "median", "max", "mean")}


def header(run: Run) -> str:
    cfg, env = run.cfg, run.env
    tokens_per_step = cfg.data.batch_size * cfg.data.grad_accum * env.world_size * cfg.data.seq_len
    method = cfg.optim.method if cfg.optim.method == "adamw" else f"{cfg.optim.method} (rank {cfg.optim.rank})"
    resumed = f", resuming after step {run.start_step}" if run.start_step else ""
    schedule = "" if cfg.optim.schedule_steps in (None, cfg.run.max_steps) else (
        f"; lr schedule planned for {cfg.optim.schedule_steps} steps, then at the floor {cfg.optim.min_lr_ratio:g} x lr")
    n_val = run.val_blocks.shape[0] * run.val_blocks.shape[1]
    return (
        f"model {cfg.model.name}: {run.n_params:,} parameters ({run.n_params / 1e6:.2f}M), {run.n_trainable:,} trainable\n"
        f"method {method}, lr {cfg.optim.lr:g}, {cfg.run.max_steps} steps of {tokens_per_step:,} tokens "
        f"({cfg.data.batch_size} x {cfg.data.grad_accum} x {env.world_size} x {cfg.data.seq_len}; recipe {C.resolved_recipe(cfg)}) "
        f"= {tokens_per_step * cfg.run.max_steps:,} tokens{schedule}\n"
        f"evaluation on {n_val:,} validation tokens every {cfg.run.eval_every or cfg.run.max_steps} steps; "
        f"on {env.device}{resumed}\n"
        f"run dir {run.run_dir}"
    )


def finished(cfg: C.TrainConfig, ckpt) -> dict | None:
    """The summary of a run already trained to ``max_steps`` (a resume with nothing to do), else None."""
    if ckpt is None:
        return None
    step = int(load_checkpoint(ckpt, lazy=True)["step"])
    summary_path = Path(cfg.run.out_dir) / "summary.json"
    if step < cfg.run.max_steps or not summary_path.is_file():
        return None
    try:
        return json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def export_hf_model(run: Run) -> Path:
    """``RUN_DIR/hf_model``: the trained model (LoRA adapters merged) and the tokenizer, for
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``."""
    if run.cfg.run.fsdp:  # gathered whole (collective), written by the main process from an unsharded copy
        from .fsdp import full_model_state
        from .models import build_model
        state = full_model_state(run.model)
        if not run.env.main:
            return run.run_dir / "hf_model"
        whole = build_model(run.model.config, 0)
        whole.load_state_dict(state)
        return save_hf_model(whole, run.tokenizer, run.run_dir / "hf_model")
    return save_hf_model(run.model, run.tokenizer, run.run_dir / "hf_model")


def pretrain(overrides: dict) -> dict:
    """Run (or resume) a pre-training run; returns the summary written to ``RUN_DIR/summary.json``."""
    wall_start = time.perf_counter()
    cfg, ckpt = resolve_config(overrides)
    done = finished(cfg, ckpt)
    if done is not None:
        print(f"run {cfg.run.out_dir} already finished {done.get('steps', cfg.run.max_steps)} of {cfg.run.max_steps} steps: "
              f"nothing to do (outputs unchanged); pass --max-steps N (N > {cfg.run.max_steps}) to extend it", flush=True)
        return done
    env = setup(cfg.run.device, single_process_group=cfg.run.fsdp)
    threads_note = None
    if env.device.type == "cpu":
        threads, why = choose_threads(cfg.run.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if ckpt is not None and cfg.run.threads and "threads" not in overrides:
            why = "the run's first session's: the same float sums, so the same losses"
        cfg = cfg.replace(threads=threads)  # recorded in config.yaml and the checkpoints
        torch.set_num_threads(threads)
        threads_note = f"CPU threads: {threads} ({why}; --threads N sets it)"
    elif cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    run, finished_here = None, False
    try:
        run = build_run(cfg, env, ckpt)
        run.wall_start = wall_start
        if env.main:
            print(header(run) + (f"\n{threads_note}" if threads_note else ""), flush=True)
        try:
            summary = train(run)
        finally:
            if env.main:
                run.log.close()
        if cfg.run.fsdp:
            export_hf_model(run)  # (collective)
        if env.main:
            if not cfg.run.fsdp:
                export_hf_model(run)
            (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            plot_runs([run.run_dir], run.run_dir / "loss.png", title=f"{cfg.model.name} {cfg.optim.method}")
            rank_png = run.run_dir / "rank.png"
            if ranks_changed(run.run_dir):
                plot_ranks(run.run_dir, rank_png, title=f"{cfg.model.name} {cfg.optim.method}: rank per matrix")
            else:
                rank_png.unlink(missing_ok=True)
            print(format_summary(summary), flush=True)
        finished_here = True
        return summary
    finally:
        # the model and the optimizer (FSDP2 state, DTensors, the collectives' pending work) are freed
        # while the process group and the interpreter are alive; on success every process then waits
        # for the others before the group goes (a failed process must not wait: the others may be gone)
        run = None
        cleanup(synchronize=finished_here)
