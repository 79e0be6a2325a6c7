"""Plots (matplotlib, Agg backend): loss curves (train raw and smoothed, validation) and rank per matrix over steps."""
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


def _read_run(run_dir: Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``; a ConfigError naming the file when it is unreadable."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"plot: '{run_dir}' is not a run directory (no metrics.jsonl)")
    try:
        return read_metrics(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"plot: cannot read '{path}': {err}") from None


def load_curves(run_dir: Path) -> dict:
    records = _read_run(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if not train and not val:
        raise ConfigError(f"plot: '{Path(run_dir) / 'metrics.jsonl'}' holds no train or eval records")
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
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(title or ("loss curves" if len(curves) > 1 else curves[0][0].resolve().name))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    """Write ``fig`` to ``out`` (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def rank_history(run_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """{matrix name: [(step, rank), ...]} from the ``ranks`` fields of a run's train records.

    The records hold the per-matrix ranks only when they change, so each list is a step function's
    corners; its last point is repeated at the run's last logged step.
    """
    records = _read_run(run_dir)
    history: dict[str, list[tuple[int, int]]] = {}
    last_step = 0
    for r in records:
        if r.get("type") != "train":
            continue
        last_step = r["step"]
        for name, rank in r.get("ranks", {}).items():
            points = history.setdefault(name, [])
            if not points or points[-1][1] != rank:
                points.append((r["step"], rank))
    for points in history.values():
        if points[-1][0] != last_step:
            points.append((last_step, points[-1][1]))
    return history


def has_rank_records(run_dir: Path) -> bool:
    return (Path(run_dir) / "metrics.jsonl").is_file() and bool(rank_history(run_dir))


def ranks_changed(run_dir: Path) -> bool:
    """True when some matrix's rank changed during the run (adaptive methods): then rank.png says something."""
    return has_rank_records(run_dir) and any(len({r for _, r in pts}) > 1 for pts in rank_history(run_dir).values())


def _module_kind(name: str) -> str:
    """'q_proj', 'gate_proj', …: the last dotted component that is not 'weight'."""
    parts = [p for p in name.split(".") if p != "weight"]
    return parts[-1] if parts else name


def draw_ranks(ax, history: dict[str, list[tuple[int, int]]], title: str) -> None:
    """Draw ``rank_history`` on ``ax``: one thin step line per matrix, coloured by module kind."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len({tuple(points) for points in history.values()}) == 1:  # fixed rank: one line says it all
        steps, ranks = zip(*next(iter(history.values())))
        ax.step(steps, ranks, where="post", linewidth=1.5, label=f"all {len(history)} projected matrices: rank {ranks[0]}"
                if len(set(ranks)) == 1 else f"all {len(history)} projected matrices")
        ax.legend(fontsize=8)
        return
    kinds = sorted({_module_kind(n) for n in history})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, points in history.items():
        steps, ranks = zip(*points)
        ax.step(steps, ranks, where="post", color=colors[kinds.index(_module_kind(name)) % len(colors)],
                alpha=0.6, linewidth=1)
    for i, kind in enumerate(kinds):
        ax.plot([], [], color=colors[i % len(colors)], label=kind)
    ax.legend(fontsize=8)


def plot_ranks(run_dir: Path, out: Path, title: str | None = None) -> Path:
    """Rank of every projected matrix of one run over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = rank_history(run_dir)
    if not history:
        raise ConfigError(f"plot: '{run_dir}' has no rank records (it was not trained with a subspace optimizer)")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    draw_ranks(ax, history, title or f"{Path(run_dir).resolve().name}: rank per matrix")
    return _save(fig, out)
