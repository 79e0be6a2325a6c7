"""The commands' configurations, in sections, as torchtitan's job config: ``model``, ``data``,
``optim``, ``precision`` and ``run``, each a dataclass whose fields are flags and YAML keys.

``fullrank pretrain`` (``train/config.py``) and ``fullrank finetune`` (``finetune/config.py``) are
each one ``Config`` of five sections; the precision section is one class for both, and so are this
module's helpers: the field declaration (:func:`option`), the type check of a value (:func:`coerce`),
the YAML reader, the argparse flags (:func:`add_flags`) and the range check naming the flag
(:func:`check`). Flags and YAML keys stay flat (``--lr``, ``lr: 0.01``: every field name is unique
over a command's sections); a YAML file may also nest them by section (``optim: {lr: 0.01}``).
``config.yaml`` files are written by section. No torch here: the command line answers ``--help``
without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SECTIONS = ("model", "data", "optim", "precision", "run")
WEIGHT_PRECISIONS = ("fp32", "bf16", "bf16-sr")
STATE_PRECISIONS = ("32bit", "8bit")


def option(default, help: str, **metadata) -> dataclasses.Field:
    """A field of a section: its default, its help text (the flag's), and ``metadata`` (e.g.
    ``flag="model"`` where the flag is not the field's name)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def with_defaults(section: type, name: str, **defaults) -> type:
    """``section`` with other defaults for some of its fields (another command's values); the help
    texts and checks stay the section's."""
    fields = []
    for f in dataclasses.fields(section):
        value = defaults.pop(f.name, default_of(f))
        fields.append((f.name, f.type, option(value, f.metadata["help"], **{k: v for k, v in f.metadata.items() if k != "help"})))
    if defaults:
        raise TypeError(f"with_defaults: {section.__name__} has no field(s) {sorted(defaults)}")
    return dataclasses.make_dataclass(name, fields, bases=(section,))


@dataclass
class Precision:
    """How the weights and the optimizer state are stored (pretrain and finetune alike)."""

    weights: str = option("fp32", "weight precision: fp32 (fp32 master weights, bf16 autocast on CUDA), bf16 (pure bf16 weights, no fp32 copy) or bf16-sr (pure bf16, the update written with stochastic rounding)")
    states: str = option("32bit", "optimizer-state precision: 32bit or 8bit (blockwise 8-bit Adam moments, projected and plain groups)")
    activation_checkpointing: bool = option(False, "recompute each decoder layer's activations during backward (transformers' gradient checkpointing): less activation memory, about a third more compute")

    def validate(self) -> None:
        if self.weights not in WEIGHT_PRECISIONS:
            raise ConfigError(f"--weights: unknown weight precision '{self.weights}'; allowed: {', '.join(WEIGHT_PRECISIONS)}")
        if self.states not in STATE_PRECISIONS:
            raise ConfigError(f"--states: unknown state precision '{self.states}'; allowed: {', '.join(STATE_PRECISIONS)}")

    def engine_options(self) -> dict:
        """The optimizer options these flags ask for (none at their defaults)."""
        options = {}
        if self.states != "32bit":
            options["states"] = self.states
        if self.weights == "bf16-sr":
            options["stochastic_rounding"] = True
        return options

    def refusal(self, method: str, err: Exception) -> ConfigError:
        """The optimizer's refusal as one line naming the flag that asked for it."""
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        flags = [f"--states {self.states}"] if self.states != "32bit" else []
        flags += ["--weights bf16-sr"] if self.weights == "bf16-sr" else []
        if flags and any(key in reason for key in ("states", "stochastic_rounding", "unexpected keyword")):
            instead = " or ".join(["--states 32bit"] * (self.states != "32bit") + ["--weights bf16"] * (self.weights == "bf16-sr"))
            return ConfigError(f"{' '.join(flags)}: optimizer '{method}' cannot run with it ({reason}); "
                               f"use {instead}, or a method that supports it")
        return ConfigError(f"optimizer '{method}': {reason}")

LORA_METHODS = ("lora", "relora")


def engine_methods() -> tuple[str, ...]:
    """The optimizer methods of the engine (``fullrank.optimizer_methods()``)."""
    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)

    return tuple(fullrank.optimizer_methods())


@dataclass
class Optim:
    """The optimizer: a method, its projected groups (rank, targets, T, α) and AdamW's hyperparameters."""

    method: str = option("fira", "optimizer method: any fullrank.make_optimizer name (adamw, galore, fira and its ablations, adarankgrad, apollo, ...: --help-optim lists them with their options), or lora")
    rank: int | None = option(None, "rank r of the projected optimizer state (or of the LoRA adapters)")
    target_modules: list = option(["self_attn", "mlp"], "comma-separated names (substrings) of the nn.Linear modules to project (or to adapt with LoRA)")
    update_proj_gap: int = option(200, "T: steps between subspace (projection) refreshes")
    scale: float | None = option(None, "α, the scale of the projected update (default: the method's)")
    proj_type: str = option("std", "projection side: std, reverse_std, left, right, full")
    optim_args: dict = option({}, "extra engine option KEY=VALUE (repeatable), e.g. gamma=1.01 or svd=randomized; --help-optim lists every method's keys")
    lr: float | None = option(None, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    lora_alpha: float = option(32.0, "LoRA alpha; the adapter is scaled by alpha/rank")
    lora_dropout: float = option(0.0, "LoRA dropout probability")

    def validate(self, methods: tuple[str, ...]) -> None:
        """The checks that need no model: the method's name, the ranges, the ``--optim-arg`` keys."""
        if self.method not in methods:
            raise ConfigError(f"--method: unknown method '{self.method}'{did_you_mean(self.method, methods)}; "
                              f"allowed: {', '.join(methods)}")
        if self.rank is not None:
            check("rank", self.rank, 1, integer=True)
        if self.lr is not None:
            check("lr", self.lr, 0.0, low_open=True)
        if self.scale is not None:
            check("scale", self.scale, 0.0, low_open=True)
        check("update_proj_gap", self.update_proj_gap, 1, integer=True)
        check("weight_decay", self.weight_decay, 0.0)
        check("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if not self.target_modules:
            raise ConfigError("--target-modules must name at least one module, e.g. self_attn,mlp (or all-linear)")
        if self.method in LORA_METHODS and self.optim_args:
            raise ConfigError(f"--optim-arg: engine options {sorted(self.optim_args)} do not apply to method "
                              f"'{self.method}' (AdamW on LoRA adapters)")
        allowed = method_options(self.method) if self.optim_args and self.method not in LORA_METHODS else {}
        for key in self.optim_args:
            flag = OWN_FLAG_OPTIONS.get(key)
            if flag is not None:
                raise ConfigError(f"--optim-arg {key}: set by its own flag; use --{flag.replace('_', '-')}"
                                  + (" and --beta2" if key == "betas" else ""))
            if key not in allowed:
                raise ConfigError(f"--optim-arg {key}: not an option of method '{self.method}'{did_you_mean(key, allowed)}; "
                                  f"allowed: {', '.join(allowed)} (see fullrank pretrain --help-optim)")


@dataclass
class Run:
    """Where and how long the run goes: steps, seed, checkpoints, the run directory, the device."""

    max_steps: int = option(10000, "optimizer steps")
    seed: int = option(42, "random seed (model initialisation, data order, LoRA, dropout)")
    save_every: int = option(1000, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "number of most recent checkpoints kept")
    out_dir: str | None = option(None, "run directory (default: runs/<model>_<method>)")
    overwrite: bool = option(False, "replace the outputs of an existing run directory")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int = option(0, "CPU threads of PyTorch; 0 = auto: the cores free now (CPU use sampled over 0.5 s), at least 1; recorded in the run, and a resume reuses it")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        check("save_every", self.save_every, 0, integer=True)
        check("keep_checkpoints", self.keep_checkpoints, 1, integer=True)
        check("threads", self.threads, 0, integer=True)
        if self.device != "auto" and not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device: unknown device '{self.device}'; allowed: auto, cpu, cuda, cuda:N")


def method_options(method: str) -> dict[str, Any]:
    """{option: default} of the keyword options ``--optim-arg`` may set for an engine ``method``.

    Read from the ``__init__`` signatures of the preset's class and its bases, and the engine's
    declared options (``SubspaceAdamW.option_table``), so the list follows the engine; the options with their
    own flag (lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type) are left out.
    """
    import inspect

    import torch

    import fullrank.optim as fullrank  # (the optimizers alone: no import of fullrank.memory)
    from .optim.methods.presets import Preset

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


class Config:
    """Base of a command's configuration: a dataclass whose fields are its sections (``SECTIONS``).
    Values are read and replaced by their flat names (``config.get("lr")``, ``config.replace(lr=…)``)
    or through their section (``config.optim.lr``)."""

    @classmethod
    def fields(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """{flat name: (section, field)} over every section, in declaration order."""
        cached = cls.__dict__.get("_fields_cache")
        if cached is None:
            cached = {}
            hints = {f.name: f for f in dataclasses.fields(cls)}
            for section, section_field in hints.items():
                for f in dataclasses.fields(section_field.default_factory()):
                    name = f.metadata.get("flag", f.name)
                    if name in cached:
                        raise TypeError(f"{cls.__name__}: flag {name!r} is declared in two sections")
                    cached[name] = (section, f)
            cls._fields_cache = cached
        return cached

    @classmethod
    def build(cls, values: dict | None = None, source: str = "values"):
        """The defaults, then ``values`` (flat names or sections of flat names, type-checked; ``source``
        names where they came from in an error)."""
        return cls().replace(**flatten(cls, values or {}, source))

    def get(self, name: str):
        section, f = self.fields()[name]
        return getattr(getattr(self, section), f.name)

    def replace(self, **values):
        """A copy with the flat ``values`` changed."""
        by_section: dict[str, dict] = {}
        fields = self.fields()
        for name, value in values.items():
            if name not in fields:
                raise ConfigError(f"unknown key '{name}'{did_you_mean(name, fields)}; allowed keys: {', '.join(fields)}")
            section, f = fields[name]
            by_section.setdefault(section, {})[f.name] = value
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)
                                           for section, changes in by_section.items()})

    def flat(self) -> dict:
        """{flat name: value} of every field."""
        return {name: self.get(name) for name in self.fields()}

    def to_dict(self) -> dict:
        """{section: {field: value}}: what ``config.yaml`` holds."""
        return {section: {f.metadata.get("flag", f.name): getattr(getattr(self, section), f.name)
                          for f in dataclasses.fields(getattr(self, section))}
                for section in (f.name for f in dataclasses.fields(self))}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def base_type(f: dataclasses.Field) -> str:
    return str(f.type).split("|")[0].strip()


def _number(text: str, default: Any) -> Any:
    """``text`` as an int or float when it is one (YAML 1.1 reads ``1e-3`` and ``inf`` as strings)."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return default


def coerce(config: type[Config], name: str, value: Any, source: str) -> Any:
    """Check (and convert) one value of the flat key ``name``; ``source`` names where it came from."""
    fields = config.fields()
    if name not in fields:
        raise ConfigError(f"{source}: unknown key '{name}'{did_you_mean(name, fields)}; allowed keys: {', '.join(fields)}")
    f = fields[name][1]
    kind = base_type(f)
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
        kinds = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                 "list": "a list of strings", "dict": "a mapping"}
        raise ConfigError(f"{source}: '{name}' must be {kinds[kind]}, got {value!r}")
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


def flatten(config: type[Config], data: dict, source: str) -> dict:
    """Flat, type-checked values from a mapping of flat keys, of sections of them, or both."""
    values = {}
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict) and not (key in config.fields() and base_type(config.fields()[key][1]) == "dict"):
            for name, item in value.items():
                values[str(name)] = coerce(config, str(name), item, f"{source}: {key}")
        else:
            values[key] = coerce(config, key, value, source)
    return values


def load_yaml(config: type[Config], path: str) -> dict:
    """The flat values of a YAML config file (flat keys or sections), each type-checked."""
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
    return flatten(config, data, f"--config {path}")


def save_yaml(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def check(name: str, value, low, high=math.inf, *, low_open=False, high_open=False, integer=False) -> None:
    """A flag's range check, as one ConfigError naming the flag (``--name``) and the range."""
    from .optim.base.options import check_range  # (the project's one range check)

    check_range("--" + name.replace("_", "-"), value, low, high, low_open=low_open,
                high_open=high_open or high == math.inf, integer=integer, error=ConfigError)  # (a flag is finite)


def parse_key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--optim-arg``, the value read as YAML (numbers are numbers)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _shown_default(value) -> str:
    if value is None or value == "" or isinstance(value, dict):
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if isinstance(value, list):
        return f" (default: {','.join(value)})"
    return f" (default: {value})"


def add_flags(parser: argparse.ArgumentParser, config: type[Config]) -> None:
    """One flag per field of ``config``'s sections, grouped by section in ``--help``; every flag
    defaults to 'not given' (argparse.SUPPRESS), so that a YAML file's value is kept."""
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    for name, (section, f) in config.fields().items():
        flag, kind = "--" + name.replace("_", "-"), base_type(f)
        help_text = f.metadata["help"] + _shown_default(default_of(f))
        group = groups[section]
        if kind == "bool":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif kind == "dict":
            group.add_argument("--optim-arg", dest=name, action="append", type=parse_key_value,
                               default=argparse.SUPPRESS, metavar="KEY=VALUE", help=help_text)
        elif kind == "list":
            group.add_argument(flag, dest=name, type=_csv, default=argparse.SUPPRESS, metavar="A,B,...", help=help_text)
        else:
            group.add_argument(flag, dest=name, type={"int": int, "float": float}.get(kind, str),
                               default=argparse.SUPPRESS, metavar={"int": "N", "float": "X"}.get(kind, name.upper()),
                               help=help_text)


def given_values(args: argparse.Namespace, config: type[Config], base: dict | None = None) -> dict:
    """The flat values given on the command line, over ``base`` (a YAML file's); ``--optim-arg`` merges."""
    values = dict(base or {})
    for name in config.fields():
        if hasattr(args, name):
            value = getattr(args, name)
            if name == "optim_args":
                value = {**values.get("optim_args", {}), **dict(value)}
            values[name] = coerce(config, name, value, "--" + name.replace("_", "-"))
    return values
