"""Optimizer-state memory: what an optimizer really holds, and the paper's estimate (appendix A.8).

``optimizer_state_bytes`` measures: the bytes of every storage behind the state tensors, each
counted once. ``estimate`` reproduces the paper's arithmetic: BF16 (2 bytes) per weight and per
optimizer-state element, weights + optimizer states (no activations, gradients or buffers), with the
per-matrix state counts of Table 1:

=============  ===========  ================================================
method         weights      optimizer states for an m×n projected matrix
=============  ===========  ================================================
AdamW          m·n          2·m·n
GaLore / Fira  m·n          2·r·max(m, n)   (+ r·min(m, n) for P, if counted)
LoRA / ReLoRA  m·n + r(m+n) 2·r·(m + n)
=============  ===========  ================================================

Embeddings, ``lm_head`` and norms are trained with AdamW by every method. Our arithmetic does not
land exactly on Table 2's figures; the convention that comes closest over the four sizes
(``PAPER_CONVENTION``) is: GiB (2³⁰ bytes), vocabulary 32,000, an untied ``lm_head``, only the
attention and MLP matrices projected, and the projection P *not* counted. ``python
bench/memory_estimate.py`` prints the comparison with the differences.
"""
from __future__ import annotations

from ..optim.core.state_bytes import optimizer_state_bytes, projected_state_bytes  # noqa: F401 (re-exported)

GIB = 2**30
GB = 10**9
ESTIMATE_METHODS = ("adamw", "galore", "fira", "lora", "relora")
PAPER_CONVENTION = dict(bytes_per_element=2, count_projection=False, unit="GiB")

# Paper Table 2 memory row (weights + optimizer states, BF16): (rank, AdamW, GaLore/Fira).
PAPER_TABLE2 = {
    "llama_60m": (128, 0.36, 0.24),
    "llama_130m": (256, 0.76, 0.52),
    "llama_350m": (256, 2.06, 1.22),
    "llama_1b": (512, 7.80, 4.38),
}


def _matrix_shapes(config) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """(projected m×n matrices, other matrices, vector elements) of a LLaMA config."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim)]
    mlp = [(i, h), (i, h), (h, i)]
    projected = (attention + mlp) * layers
    others = [(config.vocab_size, h)]
    if not getattr(config, "tie_word_embeddings", False):
        others.append((config.vocab_size, h))
    vectors = (2 * layers + 1) * h  # input/post-attention RMSNorm per layer, final norm
    return projected, others, vectors


def element_counts(config, method: str, rank: int | None = None, *, count_projection: bool = False) -> dict:
    """Weights and optimizer-state elements of ``method`` on a LLaMA ``config`` (Table 1 counts)."""
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"method must be one of {ESTIMATE_METHODS}, got {method!r}")
    if method != "adamw" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer for method {method!r}, got {rank!r}")
    projected, others, vectors = _matrix_shapes(config)
    plain = sum(m * n for m, n in others) + vectors
    weights = plain + sum(m * n for m, n in projected)
    states = 2 * plain
    for m, n in projected:
        if method == "adamw":
            states += 2 * m * n
        elif method in ("galore", "fira"):
            if rank > min(m, n):
                raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")
            states += 2 * rank * max(m, n) + (rank * min(m, n) if count_projection else 0)
        else:  # LoRA/ReLoRA: frozen W plus trainable A (r×n) and B (m×r), Adam on A and B
            weights += rank * (m + n)
            states += 2 * rank * (m + n)
    return {"weights": weights, "states": states, "total": weights + states}


def estimate(model_config, method: str, rank: int | None = None, *, bytes_per_element: int = 2,
             count_projection: bool = False, unit: str = "GiB") -> float:
    """Weights + optimizer states of ``method`` in ``unit`` ("GiB" or "GB"), the paper's estimate."""
    if unit not in ("GiB", "GB"):
        raise ValueError(f"unit must be 'GiB' or 'GB', got {unit!r}")
    counts = element_counts(model_config, method, rank, count_projection=count_projection)
    return counts["total"] * bytes_per_element / (GIB if unit == "GiB" else GB)


def paper_comparison(**convention) -> list[dict]:
    """Our estimate beside paper Table 2's memory figures, for AdamW and GaLore/Fira."""
    from ..train.models import model_config

    options = {**PAPER_CONVENTION, **convention}
    rows = []
    for name, (rank, paper_adamw, paper_fira) in PAPER_TABLE2.items():
        config = model_config(name)
        ours_adamw = estimate(config, "adamw", **options)
        ours_fira = estimate(config, "fira", rank, **options)
        rows.append(dict(model=name, rank=rank, paper_adamw=paper_adamw, ours_adamw=ours_adamw,
                         paper_fira=paper_fira, ours_fira=ours_fira))
    return rows


def format_paper_comparison(**convention) -> str:
    unit = {**PAPER_CONVENTION, **convention}["unit"]
    lines = [
        f"memory estimate (weights + optimizer states, BF16, {unit}) vs paper Table 2",
        f"{'model':<12}{'rank':>5}  {'AdamW paper':>11} {'ours':>6} {'diff':>7}   {'Fira/GaLore paper':>17} {'ours':>6} {'diff':>7}",
    ]
    for r in paper_comparison(**convention):
        d1 = (r["ours_adamw"] - r["paper_adamw"]) / r["paper_adamw"]
        d2 = (r["ours_fira"] - r["paper_fira"]) / r["paper_fira"]
        lines.append(
            f"{r['model']:<12}{r['rank']:>5}  {r['paper_adamw']:>11.2f} {r['ours_adamw']:>6.2f} {d1:>+7.1%}"
            f"   {r['paper_fira']:>17.2f} {r['ours_fira']:>6.2f} {d2:>+7.1%}"
        )
    return "\n".join(lines)

