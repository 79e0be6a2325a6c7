"""Analyses of the scaling-probe records (paper Fig. 3, Tables 7/8; rebuttal Tables r1, r2, r6, r7).

* ``same_dynamic``: within one run, per step, the vectors of per-matrix factors φ(G), φ(R) and
  φ(G − P·R) compared by ‖v1 − v2‖ (also relative to ‖v1‖) and cosine similarity, then averaged over the steps after the
  first subspace period (the rebuttal's Tables r6/r7 skip the first T steps).
* ``across_runs``: per-matrix (and per-column) factors averaged over steps in a low-rank run and a
  full-rank run, compared by Spearman, Kendall and Pearson correlations with p-values, cosine
  similarity and MSE (Fig. 3, Tables 7/8).
* ``bound_check``: how often and how tightly |φ²(G) − φ²(R)| ≤ (c_max² − c_min²)(1 − ‖R‖²/‖G‖²).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

PAIRS = (("phi_G", "phi_R"), ("phi_G", "phi_res"), ("phi_R", "phi_res"))


def _vector(step: dict, key: str, rank: str) -> np.ndarray:
    values = step[key] if key == "phi_G" else step["ranks"][rank][key]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def distance_and_cosine(v1: np.ndarray, v2: np.ndarray) -> tuple[float, float, float]:
    """(‖v1 − v2‖₂, cos(v1, v2), ‖v1 − v2‖ / ‖v1‖) over the entries finite in both."""
    keep = np.isfinite(v1) & np.isfinite(v2)
    a, b = v1[keep], v2[keep]
    if not a.size:
        return math.nan, math.nan, math.nan
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    distance = float(np.linalg.norm(a - b))
    return (distance, float(a @ b / denom) if denom else math.nan,
            distance / float(np.linalg.norm(a)) if np.linalg.norm(a) else math.nan)


def same_dynamic(probe: dict, skip: int | None = None) -> dict:
    """Tables r6/r7: per rank and pair, per-step distance/cosine and their means over steps > ``skip``
    (default: the probe's update_proj_gap T)."""
    meta, steps = probe["meta"], probe["steps"]
    skip = meta["update_proj_gap"] if skip is None else skip
    if skip < 0:
        raise ValueError(f"skip must be an integer >= 0, got {skip}")
    out = {"skip_steps": skip, "ranks": {}}
    for rank in map(str, meta["ranks"]):
        rows = {}
        for a, b in PAIRS:
            per_step = [(s["step"], *distance_and_cosine(_vector(s, a, rank), _vector(s, b, rank))) for s in steps]
            kept = [(d, c, rel) for step, d, c, rel in per_step if step > skip and math.isfinite(d)]
            rows[f"{a}~{b}"] = {
                "steps": [p[0] for p in per_step], "distance": [p[1] for p in per_step],
                "cosine": [p[2] for p in per_step], "relative_distance": [p[3] for p in per_step],
                "mean_distance": float(np.mean([k[0] for k in kept])) if kept else None,
                "mean_cosine": float(np.mean([k[1] for k in kept])) if kept else None,
                "mean_relative_distance": float(np.mean([k[2] for k in kept])) if kept else None,
                "averaged_steps": len(kept),
            }
        out["ranks"][rank] = rows
    return out


def step_average(probe: dict, key: str, rank: str | None = None) -> np.ndarray:
    """Per-matrix mean over steps of ``key`` (φ(G), or φ(R)/φ(G − P·R) at ``rank``)."""
    steps = probe["steps"]
    if not steps:
        raise ValueError("the probe file holds no step records")
    matrix = np.array([_vector(s, key, rank) for s in steps])
    return np.nanmean(matrix, axis=0)


def similarity(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman, Kendall, Pearson (with p-values), cosine similarity, MSE and RMSE relative to the
    root mean square of ``y`` (the reference side) of two vectors."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x)[keep], np.asarray(y)[keep]
    if x.size < 3:
        raise ValueError(f"need at least 3 finite pairs to compare, got {x.size}")
    spearman, kendall, pearson = stats.spearmanr(x, y), stats.kendalltau(x, y), stats.pearsonr(x, y)
    return {
        "n": int(x.size),
        "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue),
        "kendall": float(kendall.statistic), "kendall_p": float(kendall.pvalue),
        "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "mse": float(np.mean((x - y) ** 2)),
        "relative_rmse": float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(y ** 2))),
    }


def low_rank_side(probe: dict, rank: int | None) -> tuple[str, str]:
    """(rank key, source) of the factors to use as the low-rank side of a comparison."""
    ranks = [str(r) for r in probe["meta"]["ranks"]]
    if rank is None:
        if len(ranks) != 1:
            raise ValueError(f"rank: the low-rank run's probe holds ranks {ranks}; pass one of them")
        return ranks[0], "phi_R"
    if str(rank) not in ranks:
        raise ValueError(f"rank must be one of the probe's ranks {ranks}, got {rank}")
    return str(rank), "phi_R"


def across_runs(low_probe: dict, full_probe: dict, rank: int | None = None) -> dict:
    """Fig. 3 / Tables 7-8: the low-rank run's step-averaged φ(R) against the full-rank run's φ(G),
    at the matrix level and at the column level (the probes' sampled columns)."""
    names_low, names_full = low_probe["meta"]["matrices"], full_probe["meta"]["matrices"]
    if names_low != names_full:
        raise ValueError("the two probe files measure different matrices; run both on the same model")
    if low_probe["meta"]["columns"] != full_probe["meta"]["columns"]:
        raise ValueError("the two probe files sampled different columns; give both runs the same probe seed")
    rank, key = low_rank_side(low_probe, rank)
    low, full = step_average(low_probe, key, rank), step_average(full_probe, "phi_G")
    result = {"rank": int(rank), "matrices": names_low, "matrix_low_rank": low.tolist(),
              "matrix_full_rank": full.tolist(), "matrix_level": similarity(low, full)}
    if low_probe["columns"] and full_probe["columns"]:
        col_low = np.concatenate([np.array(c, dtype=float) for c in low_probe["columns"]["ranks"][rank][key]])
        col_full = np.concatenate([np.array(c, dtype=float) for c in full_probe["columns"]["phi_G"]])
        result["column_level"] = similarity(col_low, col_full)
    return result


def bound_check(probe: dict, skip: int = 0) -> dict:
    """Per rank: the fraction of (matrix, step) pairs where the rebuttal's bound holds, and the
    tightness lhs/rhs (median and 90th percentile; 1 = tight, 0 = vacuous) over steps > ``skip``."""
    out = {}
    for rank in map(str, probe["meta"]["ranks"]):
        lhs, rhs = [], []
        for s in probe["steps"]:
            if s["step"] <= skip:
                continue
            fields = s["ranks"][rank]
            for a, b in zip(fields["bound_lhs"], fields["bound_rhs"]):
                if a is not None and b is not None:
                    lhs.append(a)
                    rhs.append(b)
        lhs, rhs = np.array(lhs), np.array(rhs)
        if not lhs.size:
            out[rank] = {"pairs": 0}
            continue
        holds = lhs <= rhs * (1 + 1e-6)
        ratio = np.where(rhs > 0, lhs / np.where(rhs > 0, rhs, 1.0), np.where(lhs > 0, np.inf, 0.0))
        out[rank] = {"pairs": int(lhs.size), "holds_fraction": float(holds.mean()),
                     "tightness_median": float(np.median(ratio)), "tightness_p90": float(np.percentile(ratio, 90)),
                     "lhs_median": float(np.median(lhs)), "rhs_median": float(np.median(rhs))}
    return out
