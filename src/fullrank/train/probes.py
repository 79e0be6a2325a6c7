"""The probes ``fullrank pretrain`` carries (``--probe scaling,spikes``, ``--probe-ranks``), built from
the instruments of ``fullrank.analysis``, and what they add to ``summary.json``."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..analysis.harness import Probes, make_probes
from ..analysis.scaling_probe import projected_weights
from ..analysis.spikes import SPIKES_FILE, read_spikes, spike_summary
from .errors import ConfigError


PROBE_NAMES = ("scaling", "spikes")


def parse_probe_names(spec: str) -> tuple[str, ...]:
    """``"scaling,spikes"`` → ("scaling", "spikes"); "" → ()."""
    names = tuple(n.strip() for n in str(spec or "").split(",") if n.strip())
    bad = [n for n in names if n not in PROBE_NAMES]
    if bad:
        raise ValueError(f"probe must be a comma-separated subset of {', '.join(PROBE_NAMES)}, got {', '.join(bad)}")
    return names


def default_probe_ranks(model: nn.Module, target_modules=("self_attn", "mlp")) -> list[int]:
    """d/16 and d/2 of the shorter side of the projected matrices (the rebuttal's two ranks)."""
    short = min(min(p.shape) for _, p in projected_weights(model, target_modules))
    return sorted({max(1, short // 16), max(1, short // 2)})


def loop_probes(cfg, model: nn.Module, optimizer, run_dir: str | Path) -> Probes | None:
    """The probes ``fullrank pretrain`` carries for a config with ``probe`` (and ``probe_ranks``) set;
    None when ``cfg.run.probe`` is empty. Call on the main process only."""
    try:
        names = parse_probe_names(cfg.run.probe)
    except ValueError as err:
        raise ConfigError(f"--probe: {err}") from None
    if not names:
        return None
    if cfg.optim.layerwise:
        raise ConfigError("--probe: not available with --layerwise (each gradient is freed during backward, "
                          "before the probes can read it); drop one of them")
    targets = tuple(cfg.optim.target_modules)
    given = cfg.run.probe_ranks or []
    try:
        ranks = [int(r) for r in given]
    except (TypeError, ValueError):
        ranks = [0]
    if any(r < 1 for r in ranks):
        raise ConfigError(f"--probe-ranks: give integers >= 1 (comma-separated), got {given}")
    ranks = ranks or default_probe_ranks(model, targets)
    return make_probes(model, optimizer, run_dir, update_proj_gap=cfg.optim.update_proj_gap,
                       scaling_ranks=ranks if "scaling" in names else None, spikes="spikes" in names,
                       betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, target_modules=targets, seed=cfg.run.seed)


def probe_summary(run_dir: str | Path) -> dict:
    """Fields for ``summary.json`` from a run's probe records: the spike metric when it logged spikes."""
    path = Path(run_dir) / SPIKES_FILE
    if not path.is_file():
        return {}
    meta, records = read_spikes(path)
    return {"spikes": spike_summary(records, meta.get("update_proj_gap", 1))}
