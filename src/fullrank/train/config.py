"""The run configuration: one dataclass, filled from defaults, then a YAML file, then flags.

Every field is a flag of ``fullrank pretrain`` (``rank`` → ``--rank``) and a key of the YAML file
given with ``--config``. Relative paths in a YAML file resolve against the current directory (the
directory ``fullrank`` is started from), exactly like paths given as flags.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

LORA_METHODS = ("lora", "relora")
WEIGHT_PRECISIONS = ("fp32", "bf16", "bf16-sr")
STATE_PRECISIONS = ("32bit", "8bit")


def engine_methods() -> tuple[str, ...]:
    """The optimizer methods of the engine (``fullrank.optimizer_methods()``)."""
    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)

    return tuple(fullrank.optimizer_methods())


def all_methods() -> tuple[str, ...]:
    return (*engine_methods(), *LORA_METHODS)


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class TrainConfig:
    """Everything a pre-training run needs. ``None`` means: derive it (see ``finalize``)."""

    # --- model and method
    model: str = _f("llama_60m", "model preset (llama_tiny, llama_20m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b) or a LlamaConfig .json file")
    method: str = _f("fira", "optimizer method: any fullrank.make_optimizer name (adamw, galore, fira and its ablations, adarankgrad, apollo, ...: --help-optim lists them with their options), lora or relora")
    rank: int | None = _f(None, "rank r of the projection (or of LoRA); default: paper Table 2 (60m:128, 130m:256, 350m:256, 1b:512, 7b:1024, tiny presets d_model/4)")
    target_modules: list = _f(["self_attn", "mlp"], "comma-separated substrings of the nn.Linear names to project (or to adapt with LoRA)")
    update_proj_gap: int = _f(200, "T: steps between projection refreshes (galore/fira)")
    scale: float | None = _f(None, "alpha, the scale of the projected update (galore/fira); default 0.25, 0.0625 for llama_1b/llama_7b")
    proj_type: str = _f("std", "projection side: std, reverse_std, left, right, full")
    optim_args: dict = _f({}, "extra engine option KEY=VALUE (repeatable), e.g. gamma=1.01 or svd=randomized; --help-optim lists every method's keys", flag_type="kv")
    lora_alpha: float = _f(32.0, "LoRA alpha (lora/relora); the adapter is scaled by alpha/rank")
    lora_dropout: float = _f(0.0, "LoRA dropout probability (lora/relora)")
    relora_every: int = _f(1000, "ReLoRA: merge the adapters into the weights and restart them every N steps")
    relora_warmup: int = _f(50, "ReLoRA: steps of lr re-warm-up after each restart")
    relora_prune: float = _f(0.999, "ReLoRA: fraction of the LoRA parameters' Adam moments zeroed at each restart (smallest first moments first); 1.0 zeroes all")
    # --- optimisation
    lr: float | None = _f(None, "peak learning rate; default 1e-2 for galore/fira methods, 1e-3 for adamw/lora/relora")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    warmup_ratio: float = _f(0.1, "fraction of max_steps of linear lr warm-up")
    min_lr_ratio: float = _f(0.1, "cosine decay ends at this fraction of the peak lr")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 disables)")
    layerwise: bool = _f(False, "update each weight during backward and free its gradient at once (GaLore's layer-wise mode): one gradient alive at a time; needs --grad-clip 0, and one process or --fsdp (not DDP)")
    weights: str = _f("fp32", "weight precision: fp32 (fp32 master weights, bf16 autocast on CUDA), bf16 (pure bf16 weights, no fp32 copy) or bf16-sr (pure bf16, the update written with stochastic rounding)")
    states: str = _f("32bit", "optimizer-state precision: 32bit or 8bit (blockwise 8-bit Adam moments, projected and plain groups)")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations during backward (transformers' gradient checkpointing): less activation memory, about a third more compute")
    fsdp: bool = _f(False, "shard the model, its gradients and the optimizer state over the processes with FSDP2 (run under torchrun; checkpoints through torch.distributed.checkpoint, resumable on another number of processes at the same global batch); full-parameter methods only, not --probe; with --layerwise each weight's shard is updated as soon as it is reduce-scattered")
    max_steps: int = _f(10000, "optimizer steps (paper: 10K for 60M, 20K for 130M, 60K for 350M, 100K for 1B); a resumed run may be given more steps to extend it")
    schedule_steps: int | None = _f(None, "steps of the warm-up + cosine lr schedule; default max_steps. A run extended with --resume RUN --max-steps N keeps its original schedule (the added steps run at the floor min_lr_ratio x lr); --schedule-steps N there re-plans it")
    recipe: str = _f("auto", "defaults of batch_size, grad_accum and eval_tokens: 'paper' (64 x 8 sequences = 131K tokens per step, 10M eval tokens), 'cpu' (4 x 1 = 1K tokens per step, 16K eval tokens) or 'auto' (cpu on a CPU, paper on a GPU); explicit values win")
    batch_size: int | None = _f(None, "sequences per micro-batch per process; default from --recipe (paper 64, cpu 4)")
    grad_accum: int | None = _f(None, "micro-batches per optimizer step; tokens/step = batch_size x grad_accum x processes x seq_len; default from --recipe (paper 8: 512 x 256 = 131K tokens, cpu 1)")
    seq_len: int = _f(256, "tokens per sequence (documents are packed, EOS between them)")
    seed: int = _f(42, "random seed (model initialisation, LoRA, dropout)")
    # --- data
    data: str = _f("c4", "'c4' (streams allenai/c4 'en' from the Hugging Face Hub: needs internet) or a local .txt/.jsonl/.json.gz/.jsonl.gz/.parquet file or folder")
    val_data: str | None = _f(None, "validation corpus (same formats); default: the c4 validation split, or every k-th document of --data with k = 1/val_fraction")
    val_fraction: float = _f(0.01, "fraction of the documents of --data held out for validation when --val-data is not given")
    tokenizer: str = _f("t5-base", "hub name (needs internet), tokenizer folder, tokenizer.json or SentencePiece .model file")
    allow_repeat: bool = _f(False, "start the training corpus again when it runs out (else the run stops early with a warning)")
    # --- evaluation, logging, checkpoints
    eval_every: int = _f(1000, "evaluate every N steps (0: only at the end)")
    eval_tokens: int | None = _f(None, "validation tokens per evaluation; default from --recipe (paper: 10M as GaLore, cpu: 16,384)")
    save_every: int = _f(1000, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "number of most recent checkpoints kept")
    out_dir: str | None = _f(None, "run directory; default runs/<model>_<method>")
    overwrite: bool = _f(False, "replace the outputs of an existing run directory")
    resume: str | None = _f(None, "continue the run in this run directory from its latest checkpoint")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _f(0, "CPU threads of PyTorch (torch.set_num_threads); 0 = auto: the cores free now (CPU use sampled over 0.5 s), at least 1; recorded in the run, and a resume reuses it")
    progress: bool = _f(True, "show the tqdm progress bar")
    probe: str = _f("", "instruments to carry, comma-separated: scaling (scaling-factor probe: scaling_probe.jsonl), spikes (loss, gradient and residual norms per step: spikes.jsonl, spike metric in summary.json); empty: none")
    probe_ranks: list = _f([], "ranks of the scaling probe's shadow low-rank Adam, comma-separated (default: d/16 and d/2 of the projected matrices)")
    tensorboard: bool | None = _f(None, "write TensorBoard event files to RUN_DIR/tensorboard (needs the 'tensorboard' package: pip install fullrank[tensorboard]); default: on when it is installed")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Fields that may differ between a run and its resumption: they change no trained number.
RESUME_FREE = ("activation_checkpointing", "probe", "probe_ranks", "resume", "overwrite", "out_dir", "eval_every", "save_every", "keep_checkpoints", "device", "threads",
               "progress", "tensorboard", "recipe", "max_steps", "schedule_steps")
RECIPES = {  # batch_size, grad_accum, eval_tokens
    "paper": (64, 8, 10_000_000),
    "cpu": (4, 1, 16_384),
}
PATH_FIELDS = ("data", "val_data", "tokenizer", "out_dir", "resume")


def _type_name(f: dataclasses.Field) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "list": "a list of strings", "dict": "a mapping"}[_base_type(f)]


def _base_type(f: dataclasses.Field) -> str:
    return str(f.type).split("|")[0].strip()


def _number(text: str, default: Any) -> Any:
    """``text`` as an int or float when it is one (YAML 1.1 reads ``1e-3`` and ``inf`` as strings)."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return default


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(name: str, value: Any, source: str) -> Any:
    """Check (and convert) one value of field ``name``; ``source`` names where it came from."""
    if name not in FIELDS:
        raise ConfigError(f"{source}: unknown key '{name}'{did_you_mean(name, FIELDS)}; allowed keys: {', '.join(FIELDS)}")
    f = FIELDS[name]
    kind = _base_type(f)
    if value is None and "None" in str(f.type):
        return None
    if kind in ("int", "float") and isinstance(value, str):
        value = _number(value, value)
    if kind == "dict" and isinstance(value, dict):
        value = {k: _number(v, v) if isinstance(v, str) else v for k, v in value.items()}
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, (str, Path)),
        "bool": isinstance(value, bool),
        "list": isinstance(value, (list, tuple, str)),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: '{name}' must be {_type_name(f)}, got {value!r}")
    if kind == "float":
        return float(value)
    if kind == "str":
        return str(value)
    if kind == "list":
        items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s) for s in value]
        return [s for s in items if s]
    if kind == "dict":
        return dict(value)
    return value


def load_yaml(path: str) -> dict:
    """The mapping of a YAML config file, each value type-checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config: cannot read '{path}': {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of config keys, got {type(data).__name__}")
    return {str(k): coerce(str(k), v, f"--config {path}") for k, v in data.items()}


def build(overrides: dict) -> TrainConfig:
    """A ``TrainConfig`` from defaults and ``overrides`` (already type-checked)."""
    return dataclasses.replace(TrainConfig(), **overrides)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str) -> TrainConfig:
    return build({k: coerce(k, v, source) for k, v in data.items()})


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
        if getattr(cfg, name) is None:
            changes[name] = value
    if cfg.rank is None:
        changes["rank"] = default_rank(cfg.model, model_config(cfg.model))
    if cfg.lr is None:
        changes["lr"] = 1e-3 if cfg.method in ("adamw", *LORA_METHODS) else 1e-2
    if cfg.scale is None:
        changes["scale"] = default_scale(cfg.model)
    if cfg.out_dir is None:
        changes["out_dir"] = cfg.resume or str(Path("runs") / f"{Path(cfg.model).stem}_{cfg.method}")
    for name in ("data", "val_data", "tokenizer"):
        value = getattr(cfg, name)
        if value is not None and value != "c4" and _is_local(value):
            changes[name] = str(Path(value).resolve())
    if cfg.model.endswith(".json") and _is_local(cfg.model):
        changes["model"] = str(Path(cfg.model).resolve())
    cfg = dataclasses.replace(cfg, **changes)
    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()),
                               resume=str(Path(cfg.resume).resolve()) if cfg.resume else None)


def resolved_recipe(cfg: TrainConfig) -> str:
    """'paper' or 'cpu': ``--recipe auto`` is 'cpu' unless the run goes to a GPU."""
    if cfg.recipe != "auto":
        return cfg.recipe
    if cfg.device == "auto":
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    return "cpu" if cfg.device == "cpu" else "paper"


def method_options(method: str) -> dict[str, Any]:
    """{option: default} of the keyword options ``--optim-arg`` may set for an engine ``method``.

    Read from the ``__init__`` signatures of the preset's class and its bases, and the engine's
    declared options (``SubspaceAdamW.option_table``), so the list follows the engine; the options with their
    own flag (lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type) are left out.
    """
    import inspect

    import torch

    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)
    from ..optim.methods.presets import Preset

    if method == "adamw":
        classes = [torch.optim.AdamW]
    else:
        preset = getattr(fullrank, "PRESETS", {}).get(method)
        base = preset.base if isinstance(preset, Preset) else preset  # a preset is data: a class and options
        classes = list(base.__mro__) if inspect.isclass(base) else [fullrank.SubspaceAdamW]
    found: dict[str, Any] = {}
    for cls in classes:
        if cls.__module__.startswith("torch.") and cls is not torch.optim.AdamW:
            break  # torch's base classes (Optimizer, SGD) take what the subclass passes them, no more
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in OWN_FLAG_OPTIONS or p.name in ("self", "params"):
                continue
            found.setdefault(p.name, None if p.default is p.empty else p.default)
        if "option_table" in cls.__dict__:  # options declared in a table, not in the signature (the engine's)
            for name, (default, _) in cls.option_table().items():
                if name not in OWN_FLAG_OPTIONS:
                    found.setdefault(name, default)
            break
        if cls is torch.optim.AdamW:
            break
    try:  # the values the method really uses (a preset overrides some of the engine's defaults)
        probe = torch.nn.Parameter(torch.zeros(2, 2))
        group = fullrank.make_optimizer(method, [{"params": [probe], "rank": 1}]).param_groups[0]
        found.update({k: group[k] for k in found if k in group})
    except Exception:  # noqa: BLE001 (an optimizer that needs more than this: keep the signature's defaults)
        pass
    return dict(sorted(found.items()))


# engine options that have their own flag
OWN_FLAG_OPTIONS = {"betas": "beta1", "rank": "rank", "update_proj_gap": "update_proj_gap", "scale": "scale",
                    "proj_type": "proj_type", "lr": "lr", "weight_decay": "weight_decay", "eps": "eps",
                    "states": "states", "stochastic_rounding": "weights"}


def optim_help() -> str:
    """The ``--optim-arg`` keys of every method with their defaults (``fullrank pretrain --help-optim``)."""
    lines = ["--optim-arg KEY=VALUE keys per method, with the value the method uses in parentheses. lr, betas, eps,",
             "weight_decay, rank, update_proj_gap, scale and proj_type have their own flags; lora/relora take none.", ""]
    for method in engine_methods():
        opts = method_options(method)
        lines.append(f"{method}:")
        lines.append("  " + ", ".join(f"{k} ({v!r})" for k, v in opts.items()))
    return "\n".join(lines)


def _range(name: str, value, low, high=math.inf, *, low_open=False, high_open=False, integer=False):
    """``optim.components.check_range`` naming the flag, as a ConfigError."""
    from ..optim.base.options import check_range

    check_range("--" + name.replace("_", "-"), value, low, high, low_open=low_open,
                high_open=high_open or high == math.inf, integer=integer, error=ConfigError)  # (a flag is finite)


def validate_ranges(cfg: TrainConfig) -> None:
    """Names and numeric ranges that need no model."""
    methods = all_methods()
    if cfg.method not in methods:
        raise ConfigError(f"--method: unknown method '{cfg.method}'; allowed: {', '.join(methods)}")
    if cfg.rank is not None:
        _range("rank", cfg.rank, 1, integer=True)
    if cfg.lr is not None:
        _range("lr", cfg.lr, 0.0, low_open=True)
    if cfg.scale is not None:
        _range("scale", cfg.scale, 0.0, low_open=True)
    if cfg.weights not in WEIGHT_PRECISIONS:
        raise ConfigError(f"--weights: unknown weight precision '{cfg.weights}'; allowed: {', '.join(WEIGHT_PRECISIONS)}")
    if cfg.states not in STATE_PRECISIONS:
        raise ConfigError(f"--states: unknown state precision '{cfg.states}'; allowed: {', '.join(STATE_PRECISIONS)}")
    if cfg.recipe not in ("auto", *RECIPES):
        raise ConfigError(f"--recipe: unknown recipe '{cfg.recipe}'{did_you_mean(cfg.recipe, ('auto', *RECIPES))}; allowed: auto, {', '.join(RECIPES)}")
    for name in ("update_proj_gap", "max_steps", "batch_size", "grad_accum", "relora_every", "keep_checkpoints",
                 "eval_tokens", "schedule_steps"):
        if getattr(cfg, name) is not None:
            _range(name, getattr(cfg, name), 1, integer=True)
    for name in ("eval_every", "save_every", "relora_warmup", "threads"):
        _range(name, getattr(cfg, name), 0, integer=True)
    _range("seq_len", cfg.seq_len, 2, integer=True)
    for name in ("weight_decay", "eps", "grad_clip"):
        _range(name, getattr(cfg, name), 0.0)
    for name in ("beta1", "beta2"):
        _range(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
    _range("warmup_ratio", cfg.warmup_ratio, 0.0, 1.0, high_open=True)
    _range("min_lr_ratio", cfg.min_lr_ratio, 0.0, 1.0)
    _range("val_fraction", cfg.val_fraction, 0.0, 0.5, low_open=True)
    _range("lora_alpha", cfg.lora_alpha, 0.0, low_open=True)
    _range("lora_dropout", cfg.lora_dropout, 0.0, 1.0, high_open=True)
    _range("relora_prune", cfg.relora_prune, 0.0, 1.0)
    if not cfg.target_modules:
        raise ConfigError("--target-modules must name at least one module, e.g. self_attn,mlp")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise ConfigError(f"--device: unknown device '{cfg.device}'; allowed: auto, cpu, cuda, cuda:N")
    if cfg.layerwise and cfg.grad_clip > 0:
        raise ConfigError("--layerwise updates each weight during backward, before the global gradient norm exists: "
                          "--grad-clip must be 0 with --layerwise")
    if cfg.fsdp:
        if cfg.method in LORA_METHODS:
            raise ConfigError(f"--fsdp: method '{cfg.method}' trains LoRA adapters; --fsdp supports the full-parameter "
                              "methods (adamw and the fullrank presets)")
        if cfg.probe:
            raise ConfigError("--probe: the instruments read whole gradients on one process; not available with --fsdp")
    if cfg.method in LORA_METHODS and cfg.optim_args:
        raise ConfigError(f"--optim-arg: engine options {sorted(cfg.optim_args)} do not apply to method '{cfg.method}' (AdamW on LoRA adapters)")
    allowed = method_options(cfg.method) if cfg.optim_args and cfg.method not in LORA_METHODS else {}
    for key in cfg.optim_args:
        flag = OWN_FLAG_OPTIONS.get(key)
        if flag is not None:
            raise ConfigError(f"--optim-arg {key}: set by its own flag; use --{flag.replace('_', '-')}"
                              + (" and --beta2" if key == "betas" else ""))
        if key not in allowed:
            raise ConfigError(f"--optim-arg {key}: not an option of method '{cfg.method}'{did_you_mean(key, allowed)}; "
                              f"allowed: {', '.join(allowed)} (see fullrank pretrain --help-optim)")


def validate_against_model(cfg: TrainConfig, model_config, linears: list[tuple[str, tuple[int, int]]]) -> None:
    """seq_len against the positions, rank against the smallest projected matrix, targets present."""
    max_pos = model_config.max_position_embeddings
    if cfg.seq_len > max_pos:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings; allowed: 2..{max_pos}")
    if cfg.method == "adamw":
        return
    if not linears:
        raise ConfigError(f"--target-modules {','.join(cfg.target_modules)} matches no nn.Linear of the model; use e.g. self_attn,mlp")
    name, shape = min(linears, key=lambda item: min(item[1]))
    smallest = min(shape)
    if cfg.rank > smallest:
        raise ConfigError(
            f"--rank {cfg.rank} is larger than the smallest projected dimension ({name}: {shape[0]}x{shape[1]}); allowed: 1..{smallest}"
        )


def resume_mismatches(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """'key: saved vs given' for every field that changes training."""
    out = []
    for name in FIELDS:
        if name in RESUME_FREE or (name == "batch_size" and saved.fsdp and given.fsdp):
            continue  # (FSDP may resume on another number of processes: the global batch is checked there)
        a, b = getattr(saved, name), getattr(given, name)
        if a != b:
            out.append(f"{name}={a!r} (saved) vs {b!r} (given)")
    return out


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def parse_key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--optim-arg`` (pretrain and finetune), the value read as YAML (numbers are numbers)."""
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value
