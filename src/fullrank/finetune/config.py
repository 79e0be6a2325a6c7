"""``fullrank finetune``'s options: one dataclass whose fields are the command's flags (``rank`` →
``--rank``), the paper's recipe as defaults (§5.3). No torch here: the command line reads it to
answer ``--help`` at once."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..train.config import _f

LORA = "lora"
SCORINGS = ("generate", "likelihood")
DEFAULT_TRAIN = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
DEFAULT_EVAL = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "predictions.jsonl", "summary.json", "loss.png", "hf_model")


@dataclass
class FinetuneConfig:
    """Every option of ``fullrank finetune``; the defaults are the paper's recipe (§5.3)."""

    model: str = _f("", "Hugging Face causal-LM folder, `fullrank pretrain` run directory, or a fullrank LLaMA config name (random init)")
    tokenizer: str = _f("", "tokenizer folder or hub name (default: the model folder's own; t5-base for a config name)")
    method: str = _f("fira", "optimizer: any `fullrank.make_optimizer` name, or lora (peft LoRA + AdamW)")
    rank: int = _f(32, "rank of the projected optimizer state (Fira/GaLore) or of the LoRA adapters")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                              "comma-separated module names or regular expressions, or all-linear")
    update_proj_gap: int = _f(200, "steps between subspace (projection) updates")
    scale: float = _f(0.0, "Fira/GaLore scale alpha (0: the optimizer's default)")
    proj_type: str = _f("std", "projection side: std, reverse_std, left, right, full")
    optim_args: dict = _f({}, "extra engine option KEY=VALUE (repeatable), e.g. --optim-arg seed=1")
    lora_alpha: float = _f(64.0, "LoRA alpha (LLM-Adapters: 2 x rank)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    train: list = _f(DEFAULT_TRAIN, "comma-separated training tasks (their union is trained on)")
    eval: list = _f(DEFAULT_EVAL, "comma-separated evaluation tasks (accuracy reported per task)")
    data_dir: str = _f("../shared/data/commonsense", "folder of TASK-{train,test}.jsonl.gz files")
    train_limit: int = _f(0, "training records drawn per task (0: all)")
    eval_limit: int = _f(0, "test records drawn per task (0: all)")
    epochs: float = _f(3.0, "training epochs (ignored when --max-steps > 0)")
    max_steps: int = _f(0, "optimizer steps (0: --epochs over the training set)")
    lr: float = _f(1e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    batch_size: int = _f(16, "sequences per optimizer step")
    micro_batch_size: int = _f(4, "sequences per forward pass (batch_size / micro_batch_size = gradient accumulation)")
    warmup_steps: int = _f(100, "linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = _f(1.0, "global gradient-norm clipping (0: off)")
    cutoff_len: int = _f(256, "longest training sequence in tokens; longer examples are dropped")
    scoring: list = _f(list(SCORINGS), "comma-separated: generate (LLM-Adapters' answer extraction), likelihood (best option)")
    max_new_tokens: int = _f(32, "tokens generated per test question (generate scoring)")
    eval_batch_size: int = _f(16, "sequences per evaluation forward pass")
    dtype: str = _f("float32", "weight dtype: float32, bfloat16, float16")
    bf16: bool = _f(False, "bf16 autocast (mixed precision) on CUDA")
    weights: str = _f("", "weight precision: fp32, bf16 (pure bf16) or bf16-sr (pure bf16, the update written with stochastic rounding); sets --dtype (default: --dtype's)")
    states: str = _f("32bit", "optimizer-state precision: 32bit or 8bit (blockwise 8-bit Adam moments)")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations during backward (transformers' checkpointing): less memory, more compute")
    device: str = _f("auto", "auto (CUDA when available), cpu or cuda")
    threads: int = _f(0, "CPU threads of PyTorch; 0 = auto: the cores free now (CPU use sampled over 0.5 s), at least 1")
    seed: int = _f(42, "seed of the data order, subsets, LoRA init and random-init models")
    save_every: int = _f(200, "checkpoint every N steps (and at the end); 0: at the end only")
    keep_checkpoints: int = _f(2, "newest checkpoints kept")
    save_model: bool = _f(True, "save the fine-tuned model (LoRA merged) and tokenizer to RUN_DIR/hf_model")
    out_dir: str = _f("", "run directory (default: runs/finetune_<model>_<method>)")
    overwrite: bool = _f(False, "replace the outputs of an existing run directory")
    progress: bool = _f(True, "progress bars")


FIELDS = {f.name: f for f in fields(FinetuneConfig)}
LIST_FIELDS = ("target_modules", "train", "eval", "scoring")
RESUME_FREE = ("threads", "progress", "device", "eval_batch_size", "activation_checkpointing")  # may change on --resume
