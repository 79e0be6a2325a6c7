"""The model to fine-tune: a local Hugging Face causal-LM folder, a ``fullrank pretrain`` run
directory (its ``hf_model/`` folder, or else its newest checkpoint), or a fullrank LLaMA config name
(random initialisation, for tests and demos)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..train.errors import ConfigError, first_line
from ..train.models import MODEL_NAMES, build_model, model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALLOWED = f"a Hugging Face causal-LM folder, a `fullrank pretrain` run directory, or one of {', '.join(MODEL_NAMES)}"


def load_tokenizer(spec: str, flag: str = "--tokenizer"):
    """``AutoTokenizer`` from a folder or hub name (cached copy offline), with a padding token."""
    from transformers import AutoTokenizer

    from ..train.hub import hub_reachable

    path = Path(spec)
    local_only = path.exists() or not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
    except Exception as err:  # OSError offline or for a folder without tokenizer files, ValueError for bad files
        raise ConfigError(f"{flag}: cannot load tokenizer '{spec}': {first_line(err)[:200]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{flag}: tokenizer '{spec}' defines no end-of-sequence token")
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers have none; LLM-Adapters pads with id 0 (<unk>)
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.model_max_length = int(1e9)
    return tokenizer


def _pretrain_checkpoint_model(run_dir: Path, seed: int):
    """(model, tokenizer spec) from a pretrain run's config.yaml and newest checkpoint."""
    from ..train.checkpoint import latest_checkpoint, load_checkpoint

    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"--model: pretrain run directory '{run_dir}' holds neither hf_model/ nor a checkpoint")
    if saved.get("method") in ("lora", "relora"):
        raise ConfigError(f"--model: '{run_dir}' was pre-trained with {saved['method']}; its checkpoint holds adapters, not a plain causal LM")
    model = build_model(model_config(str(saved["model"])), seed)
    try:
        model.load_state_dict(load_checkpoint(ckpt)["model"])
    except RuntimeError as err:
        raise ConfigError(f"--model: checkpoint '{ckpt}' does not match model '{saved['model']}': {first_line(err)[:160]}") from None
    return model, saved.get("tokenizer")


def load_model(spec: str, tokenizer_spec: str | None, seed: int, dtype: str = "float32", progress: bool = True):
    """(model, tokenizer) for ``--model``/``--tokenizer``; one-line ConfigErrors for bad input."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    torch_dtype = DTYPES[dtype]
    path = Path(spec)
    if spec in MODEL_NAMES:
        model, default_tokenizer = build_model(model_config(spec), seed), "t5-base"
    elif path.is_dir() and (path / "hf_model").is_dir():
        return load_model(str(path / "hf_model"), tokenizer_spec, seed, dtype, progress)
    elif path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        model, default_tokenizer = _pretrain_checkpoint_model(path, seed)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model: folder '{spec}' holds no config.json; give {_ALLOWED}")
        try:
            config = AutoConfig.from_pretrained(spec, local_files_only=True)
        except Exception as err:
            raise ConfigError(f"--model: cannot read '{path / 'config.json'}': {first_line(err)[:200]}") from None
        try:
            import transformers

            dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **{dtype_key: torch_dtype})
        except ValueError as err:
            if "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(err):
                raise ConfigError(f"--model: '{spec}' is not a causal language model (model_type '{config.model_type}' has no causal-LM head)") from None
            raise ConfigError(f"--model: cannot load '{spec}': {first_line(err)[:200]}") from None
        except OSError as err:
            raise ConfigError(f"--model: cannot load weights from '{spec}': {first_line(err)[:200]}") from None
        default_tokenizer = spec
    else:
        raise ConfigError(f"--model: '{spec}' does not exist; give {_ALLOWED}")
    tokenizer = load_tokenizer(tokenizer_spec or default_tokenizer)
    vocab, added = tokenizer.get_vocab(), set(tokenizer.get_added_vocab())
    base = 1 + max((i for t, i in vocab.items() if t not in added), default=0)  # T5's 100 <extra_id_N> never occur in text
    if base > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"--tokenizer: '{tokenizer_spec or default_tokenizer}' has {base} tokens but the model's vocabulary has "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model.to(torch_dtype), tokenizer


def apply_lora(model, module_names: list[str], rank: int, alpha: float, dropout: float):
    """peft LoRA on ``module_names`` with every other weight frozen (LLM-Adapters' LoRA baseline)."""
    from peft import LoraConfig, get_peft_model

    from .._quiet import no_transformers_deprecations

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=module_names, bias="none",
                        task_type="CAUSAL_LM")
    with no_transformers_deprecations():
        return get_peft_model(model, config)
