"""Loss curves (matplotlib, Agg backend): train loss (raw and smoothed) and validation loss per step."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .metrics import read_metrics


def _smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider)."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**t) if weight > 0 else v)
    return out


def load_curves(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"plot: '{run_dir}' is not a run directory (no metrics.jsonl)")
    try:
        records = read_metrics(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"plot: cannot read '{path}': {err}") from None
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if not train and not val:
        raise ConfigError(f"plot: '{path}' holds no train or eval records")
    return {"train": train, "val": val}


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    """Overlay the curves of ``run_dirs`` in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(Path(d), load_curves(Path(d))) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, c) in enumerate(curves):
        color, name = colors[i % len(colors)], run_dir.resolve().name
        if c["train"]:
            steps, losses = zip(*c["train"])
            weight = 0.9 * min(1.0, len(losses) / 100)
            if len(curves) == 1:
                ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(list(losses), weight), color=color, linewidth=1.5, label=f"{name} train")
        if c["val"]:
            steps, losses = zip(*c["val"])
            ax.plot(steps, losses, color=color, linestyle="--", marker="o", markersize=4, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(title or ("loss curves" if len(curves) > 1 else curves[0][0].resolve().name))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
