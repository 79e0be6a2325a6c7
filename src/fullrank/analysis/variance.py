"""Variance of the scaling factor early in training (paper Appendix A.1, Theorem 1, Fig. 8).

Under the theorem's assumptions (gradient entries i.i.d. N(0, σ²)), Adam on R = Pᵀ·G at rank r
gives a factor φ(R) = ‖ψ(R)‖/‖R‖ whose spread shrinks as r grows: φ averages over r·n entries.
``simulate`` measures it: for each rank, ``trials`` independent runs of Adam on projected i.i.d.
normal gradients (P a random r-dimensional orthonormal basis, refreshed never: the first steps
lie inside one subspace period) and, per step t ≤ ``steps``, the variance of φ_t across trials
(matrix level) and across the columns of one trial (column level, eq. 11), averaged over t.
``measured`` gives the real-gradient counterpart from a scaling-probe file: per rank, the
variance of φ(R) over the first ``steps`` steps, averaged over matrices.
"""
from __future__ import annotations

import numpy as np
import torch

from .adam_math import ShadowAdam, column_scaling_factors, scaling_factor

DEFAULT_RANKS = (1, 4, 16, 64, 256)


def simulate(ranks=DEFAULT_RANKS, rows: int = 256, cols: int = 256, steps: int = 10, trials: int = 64,
             betas=(0.9, 0.999), eps: float = 1e-8, sigma: float = 1.0, seed: int = 0) -> dict:
    """Fig. 8 under Theorem 1's assumptions; returns per-rank variances and the per-step φ means."""
    for name, value, low in (("rows", rows, 1), ("cols", cols, 1), ("steps", steps, 2), ("trials", trials, 2)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    bad = [r for r in ranks if not 1 <= r <= rows]
    if bad:
        raise ValueError(f"ranks must lie in [1, rows={rows}], got {bad}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    generator = torch.Generator().manual_seed(seed)
    out = {"rows": rows, "cols": cols, "steps": steps, "trials": trials, "sigma": sigma, "ranks": {}}
    for rank in ranks:
        phis = np.zeros((trials, steps))
        column_var = np.zeros((trials, steps))
        for trial in range(trials):
            basis = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
            adam = ShadowAdam((rank, cols), betas, eps, "cpu")
            for t in range(steps):
                grad = sigma * torch.randn(rows, cols, generator=generator)
                low = basis.T @ grad
                psi = adam.update(low)
                phis[trial, t] = scaling_factor(psi, low).item()
                column_var[trial, t] = column_scaling_factors(psi, low).var().item()
        out["ranks"][str(rank)] = {
            "variance_across_trials": float(phis.var(axis=0, ddof=1).mean()),
            "variance_over_steps": float(phis.var(axis=1, ddof=1).mean()),
            "relative_variance_over_steps": float((phis.var(axis=1, ddof=1) / phis.mean(axis=1) ** 2).mean()),
            "column_variance": float(column_var.mean()),
            "mean_phi_per_step": phis.mean(axis=0).tolist(),
        }
    return out


def measured(probe: dict, steps: int = 10) -> dict:
    """Per probe rank: variance over the first ``steps`` steps of φ(R), averaged over matrices
    (the same statistic as ``simulate``'s ``variance_over_steps``), and the same for φ(G); and the
    scale-free relative variance var(φ)/mean(φ)² (φ scales as 1/σ of the gradient)."""
    if steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps}")
    first = [s for s in probe["steps"] if s["step"] <= steps]
    if len(first) < 2:
        raise ValueError(f"the probe file holds {len(first)} of the first {steps} steps; need at least 2")

    def variance(rows: list[list], relative: bool = False) -> float:
        matrix = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        var = np.nanvar(matrix, axis=0, ddof=1)
        return float(np.nanmean(var / np.nanmean(matrix, axis=0) ** 2 if relative else var))

    out = {"steps": len(first), "full_rank": variance([s["phi_G"] for s in first]),
           "full_rank_relative": variance([s["phi_G"] for s in first], True), "ranks": {}, "relative": {}}
    for rank in map(str, probe["meta"]["ranks"]):
        out["ranks"][rank] = variance([s["ranks"][rank]["phi_R"] for s in first])
        out["relative"][rank] = variance([s["ranks"][rank]["phi_R"] for s in first], True)
    return out
