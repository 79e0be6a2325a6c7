"""Figures of the instruments: Fig. 3 (sorted per-matrix φ), similarity over steps, Fig. 8
(variance vs rank) and the spike plot (loss and ‖S‖ with the subspace refreshes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .spikes import DEFAULT_THRESHOLD, DEFAULT_WINDOW, find_spikes, read_spikes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    _pyplot().close(fig)
    return out


def plot_scaling_sorted(across: dict, out: Path, title: str | None = None) -> Path:
    """Fig. 3: per-matrix φ averaged over steps, matrices sorted by the full-rank factor."""
    plt = _pyplot()
    full, low = np.array(across["matrix_full_rank"]), np.array(across["matrix_low_rank"])
    order = np.argsort(full)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(range(len(order)), full[order], "o-", markersize=3, label="full-rank (AdamW): φ(G)")
    ax.plot(range(len(order)), low[order], "s-", markersize=3, label=f"low-rank r={across['rank']}: φ(R)")
    stats = across["matrix_level"]
    ax.set_xlabel("matrix (sorted by full-rank φ)")
    ax.set_ylabel("scaling factor φ, mean over steps")
    ax.set_yscale("log")
    ax.set_title(title or "scaling factors, low-rank vs full-rank")
    ax.text(0.02, 0.95, f"Spearman {stats['spearman']:.3f}, Kendall {stats['kendall']:.3f}, Pearson {stats['pearson']:.3f}",
            transform=ax.transAxes, va="top", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out)


def plot_same_dynamic(same: dict, out: Path) -> Path:
    """Cosine similarity over steps of the per-matrix factor vectors (Tables r6/r7), one line per rank."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for rank, rows in same["ranks"].items():
        for ax, pair in zip(axes, ("phi_G~phi_R", "phi_G~phi_res")):
            row = rows[pair]
            ax.plot(row["steps"], row["cosine"], linewidth=1, label=f"r={rank}")
    for ax, pair in zip(axes, ("φ(G) vs φ(R)", "φ(G) vs φ(G − P·R)")):
        ax.axvline(same["skip_steps"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("cosine similarity of per-matrix φ")
        ax.set_title(pair)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def plot_variance(simulated: dict, measured: dict | None, out: Path) -> Path:
    """Fig. 8: relative variance var(φ)/mean(φ)² over the first steps against the rank (log-log;
    scale-free, so simulated and real gradients share the axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ranks = [int(r) for r in simulated["ranks"]]
    ax.plot(ranks, [simulated["ranks"][str(r)]["relative_variance_over_steps"] for r in ranks], "o-",
            label=f"simulated, i.i.d. N(0,1) {simulated['rows']}x{simulated['cols']}, relative, over steps")
    ax.plot(ranks, [simulated["ranks"][str(r)]["variance_across_trials"] for r in ranks], "^--",
            label="simulated, variance across trials (Theorem 1's, σ = 1)")
    if measured:
        real = sorted((int(r), v) for r, v in measured["relative"].items())
        ax.plot([r for r, _ in real], [v for _, v in real], "s-", label="real gradients (probe), relative, over steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"variance of φ(R), first {simulated['steps']} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_spikes(run_dirs: list[Path], out: Path, threshold: float = DEFAULT_THRESHOLD,
                window: int = DEFAULT_WINDOW) -> Path:
    """Loss (spikes marked) and ‖S‖ before/after the limiter (or the gradient norm when the optimizer
    has no residual) over steps, with the subspace refreshes as vertical lines."""
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory with spike records")
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), dpi=120, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run_dir in enumerate(map(Path, run_dirs)):
        _meta, steps = read_spikes(run_dir)
        color, name = colors[i % len(colors)], run_dir.resolve().name
        x = [s["step"] for s in steps]
        losses = [s.get("loss") for s in steps]
        top.plot(x, losses, color=color, linewidth=1, label=name)
        spikes = find_spikes(losses, threshold, window)
        top.plot([x[j] for j in spikes], [losses[j] for j in spikes], "x", color=color, markersize=7)
        if any(s.get("residual_norm") is not None for s in steps):
            bottom.plot(x, [s.get("residual_norm") for s in steps], color=color, linewidth=1, label=f"{name} ‖S‖ before limiter")
            bottom.plot(x, [s.get("limited_norm") for s in steps], color=color, linewidth=1, linestyle="--",
                        label=f"{name} ‖S‖ after limiter")
        else:
            bottom.plot(x, [s.get("grad_norm") for s in steps], color=color, linewidth=1, linestyle=":",
                        label=f"{name} ‖G‖ (no residual)")
        if i == 0:
            for s in steps:
                if s.get("refresh") and s["step"] > 1:
                    for ax in (top, bottom):
                        ax.axvline(s["step"], color="grey", linestyle=":", linewidth=0.8)
    top.set_ylabel("training loss")
    top.set_title(f"loss (x: spike, > {1 + threshold:g} × running median of {window}); dotted: subspace refresh")
    bottom.set_ylabel("norm")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)
