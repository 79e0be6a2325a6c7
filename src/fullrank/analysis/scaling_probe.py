"""The scaling-factor probe (paper Fig. 3, Tables 7/8; rebuttal Tables r1, r2, r6, r7).

During any run it measures, for every projected matrix and every step, on the gradient G the
optimizer is about to use:

* φ(G): from the real optimizer's Adam moments when it keeps full-size ones for that matrix
  (``torch.optim.AdamW``), else from a shadow full-size Adam;
* for each probe rank r: φ(R) of a shadow low-rank Adam on R = Pᵀ·G (P = top-r left singular
  vectors of G, refreshed every ``update_proj_gap`` steps, moments kept across refreshes as GaLore
  does) and φ(G − P·R) of a shadow Adam on the residual;
* column-level φ (eq. 11) of ``columns`` fixed random columns per matrix, averaged over steps;
* both sides of the rebuttal's bound |φ²(G) − φ²(R)| ≤ (c_max² − c_min²)·(1 − ‖R‖²/‖G‖²), with c
  Adam's element-wise factor 1/(√v̂ + ε) of G and of R (c_max, c_min over both matrices).

Matrices are oriented so that the projected side is the shorter one (GaLore's rule): an m×n
gradient with m > n is handled as its n×m transpose; "columns" are those of the oriented matrix.
The probe only reads gradients and optimizer state: the run is unchanged (tested). Records stay on
the device and are written every ``flush_every`` steps (one host sync per flush) as JSON lines.
Cost per m×n matrix: 2·m·n + 2·r·max(m, n) numbers per probe rank (the residual and low-rank
shadow moments), plus 2·m·n when the optimizer keeps no full-size moments of it, and one SVD per
matrix every ``update_proj_gap`` steps: cheap for small models, not meant for billion-parameter runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .adam_math import (
    ShadowAdam,
    adam_correction,
    column_scaling_factors,
    preconditioner,
    scaling_factor,
)

DEFAULT_TARGET_MODULES = ("self_attn", "mlp")
PROBE_FILE = "scaling_probe.jsonl"
DEFAULT_COLUMNS = 100  # the paper samples 100 columns per matrix (Tables 7/8)
RANK_FIELDS = ("phi_R", "phi_res", "norm_R", "bound_lhs", "bound_rhs")


def projected_weights(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every trainable 2-D ``nn.Linear`` weight whose module name contains a target."""
    found = [(f"{name}.weight", module.weight) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(t in name for t in target_modules)
             and module.weight.requires_grad]
    if not found:
        raise ValueError(f"target_modules={list(target_modules)} matched no trainable nn.Linear of the model")
    return found


class _Matrix:
    """Shadow state of one matrix: its orientation, sampled columns, and the per-rank subspaces."""

    def __init__(self, name: str, param: torch.Tensor, ranks: list[int], betas, eps, columns: int,
                 generator: torch.Generator, shadow_full: bool):
        self.name, self.param = name, param
        m, n = param.shape
        self.transpose = m > n
        self.short, self.long = min(m, n), max(m, n)
        device = param.device
        self.columns = torch.randperm(self.long, generator=generator)[:min(columns, self.long)].sort().values.to(device)
        self.ranks = [min(r, self.short) for r in ranks]
        self.low = [ShadowAdam((r, self.long), betas, eps, device) for r in self.ranks]
        self.res = [ShadowAdam((self.short, self.long), betas, eps, device) for _ in self.ranks]
        self.bases: list[torch.Tensor | None] = [None] * len(ranks)
        self.full = ShadowAdam((self.short, self.long), betas, eps, device) if shadow_full else None

    def oriented(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().float()
        return tensor.T if self.transpose else tensor


class ScalingProbe:
    """Measures φ(G), φ(R) and φ(G − P·R) per matrix and step; see the module docstring.

    Call ``before_step(step)`` once the gradients are final (after accumulation and clipping) and
    right before ``optimizer.step()``, ``after_step(step)`` right after it, and ``close()`` at the
    end (it writes the column averages). ``step`` is the 0-based optimizer step.
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 out_path: str | Path, *, ranks, update_proj_gap: int, betas=(0.9, 0.999), eps: float = 1e-8,
                 columns: int = DEFAULT_COLUMNS, seed: int = 0, flush_every: int = 50):
        ranks = [int(r) for r in ranks]
        if not ranks or any(r < 1 for r in ranks):
            raise ValueError(f"ranks must be a non-empty list of integers >= 1, got {ranks}")
        if update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be an integer >= 1, got {update_proj_gap}")
        if columns < 1:
            raise ValueError(f"columns must be an integer >= 1, got {columns}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every}")
        if any(p.dim() != 2 for _, p in named_params):
            raise ValueError("named_params: the scaling probe measures 2-D weight matrices only")
        self.optimizer, self.out_path = optimizer, Path(out_path)
        self.ranks, self.gap, self.betas, self.eps = ranks, int(update_proj_gap), tuple(betas), float(eps)
        self.flush_every = flush_every
        generator = torch.Generator().manual_seed(seed)
        self.matrices = [_Matrix(name, p, ranks, self.betas, self.eps, columns, generator,
                                 shadow_full=not self._has_full_moments(p)) for name, p in named_params]
        self.full_source = "shadow" if any(mx.full is not None for mx in self.matrices) else "optimizer"
        self._pending: list[dict] = []
        self._current: dict | None = None
        self._column_sums: dict[str, list[torch.Tensor]] = {}
        self._column_steps = 0
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_path, "w", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)
        self._write({"type": "meta", "matrices": [mx.name for mx in self.matrices],
                     "shapes": [list(mx.param.shape) for mx in self.matrices], "ranks": ranks,
                     "effective_ranks": {str(r): [mx.ranks[k] for mx in self.matrices] for k, r in enumerate(ranks)},
                     "update_proj_gap": self.gap, "betas": list(self.betas), "eps": self.eps,
                     "full_source": self.full_source,
                     "columns": [mx.columns.tolist() for mx in self.matrices]})

    def _has_full_moments(self, param: torch.Tensor) -> bool:
        state = self.optimizer.state.get(param, {}) if hasattr(self.optimizer, "state") else {}
        group = next((g for g in self.optimizer.param_groups if any(q is param for q in g["params"])), None)
        if group is None or "betas" not in group:
            return False
        # AdamW creates its state lazily: a plain torch.optim.AdamW keeps full-size moments.
        if not state:
            return type(self.optimizer) in (torch.optim.AdamW, torch.optim.Adam) and not group.get("amsgrad", False)
        return "exp_avg" in state and state["exp_avg"].shape == param.shape and "exp_avg_sq" in state

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Shadow updates on the current gradients (no host sync)."""
        if self._current is not None:
            raise RuntimeError(f"ScalingProbe.before_step({step}) called twice without after_step")
        refresh = step % self.gap == 0
        rows: dict[str, list] = {"norm_G": [], "phi_G_shadow": [], "cmax_R": [], "cmin_R": []}
        per_rank = {r: {f: [] for f in ("phi_R", "phi_res", "norm_R", "cmax_R", "cmin_R")} for r in self.ranks}
        columns_low = {r: [] for r in self.ranks}
        columns_res = {r: [] for r in self.ranks}
        grads = []
        for mx in self.matrices:
            if mx.param.grad is None:
                raise RuntimeError(f"ScalingProbe: parameter {mx.name} has no gradient at step {step}")
            g = mx.oriented(mx.param.grad)
            grads.append(g)
            rows["norm_G"].append(torch.linalg.vector_norm(g))
            if mx.full is not None:
                psi = mx.full.update(g)
                rows["phi_G_shadow"].append((scaling_factor(psi, g), column_scaling_factors(psi[:, mx.columns], g[:, mx.columns])))
            if refresh:
                u = torch.linalg.svd(g, full_matrices=False).U
                mx.bases = [u[:, :r].contiguous() for r in mx.ranks]
            for k, r in enumerate(self.ranks):
                basis = mx.bases[k]
                low = basis.T @ g
                residual = g - basis @ low
                psi_low = mx.low[k].update(low)
                psi_res = mx.res[k].update(residual)
                c = mx.low[k].preconditioner()
                bucket = per_rank[r]
                bucket["phi_R"].append(scaling_factor(psi_low, low))
                bucket["phi_res"].append(scaling_factor(psi_res, residual))
                bucket["norm_R"].append(torch.linalg.vector_norm(low))
                bucket["cmax_R"].append(c.amax())
                bucket["cmin_R"].append(c.amin())
                columns_low[r].append(column_scaling_factors(psi_low[:, mx.columns], low[:, mx.columns]))
                columns_res[r].append(column_scaling_factors(psi_res[:, mx.columns], residual[:, mx.columns]))
        self._current = {"step": step, "grads": grads, "rows": rows, "per_rank": per_rank,
                         "columns_low": columns_low, "columns_res": columns_res, "refresh": refresh}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """φ(G) from the optimizer's updated moments (or the shadow's), the bound, and the record."""
        current, self._current = self._current, None
        if current is None or current["step"] != step:
            raise RuntimeError(f"ScalingProbe.after_step({step}) without a matching before_step")
        phi_g, cmax_g, cmin_g, columns_g = [], [], [], []
        shadow_iter = iter(current["rows"]["phi_G_shadow"])
        for mx, g in zip(self.matrices, current["grads"]):
            if mx.full is not None:
                phi, cols = next(shadow_iter)
                c = mx.full.preconditioner()
            else:
                state = self.optimizer.state[mx.param]
                group = next(gr for gr in self.optimizer.param_groups if any(q is mx.param for q in gr["params"]))
                t = int(state["step"])
                m, v = mx.oriented(state["exp_avg"]), mx.oriented(state["exp_avg_sq"])
                psi = adam_correction(m, v, t, tuple(group["betas"]), group["eps"])
                phi, cols = scaling_factor(psi, g), column_scaling_factors(psi[:, mx.columns], g[:, mx.columns])
                c = preconditioner(v, t, group["betas"][1], group["eps"])
            phi_g.append(phi)
            columns_g.append(cols)
            cmax_g.append(c.amax())
            cmin_g.append(c.amin())
        phi_g, cmax_g, cmin_g = torch.stack(phi_g), torch.stack(cmax_g), torch.stack(cmin_g)
        norm_g = torch.stack(current["rows"]["norm_G"])
        record = {"step": step + 1, "refresh": current["refresh"], "phi_G": phi_g, "norm_G": norm_g, "ranks": {}}
        for r, bucket in current["per_rank"].items():
            phi_r, norm_r = torch.stack(bucket["phi_R"]), torch.stack(bucket["norm_R"])
            c_max = torch.maximum(cmax_g, torch.stack(bucket["cmax_R"]))
            c_min = torch.minimum(cmin_g, torch.stack(bucket["cmin_R"]))
            lhs = (phi_g.square() - phi_r.square()).abs()
            rhs = (c_max.square() - c_min.square()) * (1.0 - norm_r.square() / norm_g.square())
            record["ranks"][str(r)] = {"phi_R": phi_r, "phi_res": torch.stack(bucket["phi_res"]),
                                       "norm_R": norm_r, "bound_lhs": lhs, "bound_rhs": rhs}
        self._accumulate_columns(columns_g, current)
        self._pending.append(record)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def _accumulate_columns(self, columns_g, current) -> None:
        entries = {"phi_G": columns_g}
        for r in self.ranks:
            entries[f"phi_R/{r}"] = current["columns_low"][r]
            entries[f"phi_res/{r}"] = current["columns_res"][r]
        for key, cols in entries.items():
            sums = self._column_sums.setdefault(key, [torch.zeros_like(c) for c in cols])
            for total, c in zip(sums, cols):
                total.add_(torch.nan_to_num(c, nan=0.0))
        self._column_steps += 1

    def flush(self) -> None:
        """Write the buffered per-step records (one host transfer)."""
        for record in self._pending:
            out = {"type": "step", "step": record["step"], "refresh": record["refresh"],
                   "phi_G": _floats(record["phi_G"]), "norm_G": _floats(record["norm_G"]),
                   "ranks": {r: {f: _floats(v) for f, v in fields.items()} for r, fields in record["ranks"].items()}}
            self._write(out)
        self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        """Flush, write the per-column averages over all steps, close the file."""
        if self._file.closed:
            return
        self.flush()
        if self._column_steps:
            means = {key: [_floats(s / self._column_steps) for s in sums] for key, sums in self._column_sums.items()}
            self._write({"type": "columns", "steps": self._column_steps, "phi_G": means.pop("phi_G"),
                         "ranks": {str(r): {"phi_R": means[f"phi_R/{r}"], "phi_res": means[f"phi_res/{r}"]}
                                   for r in self.ranks}})
        self._file.close()

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")


def _floats(tensor: torch.Tensor) -> list[float | None]:
    """A 1-D tensor as JSON numbers (NaN/inf as null)."""
    return [v if math.isfinite(v) else None for v in tensor.detach().cpu().double().tolist()]


def read_probe(path: str | Path) -> dict:
    """A probe file as {"meta", "steps": [records], "columns": record or None}."""
    path = Path(path)
    if path.is_dir():
        path = path / PROBE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"probe records '{path}' do not exist (run with the scaling probe on)")
    meta, steps, columns = None, [], None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            kind = record.get("type")
            if kind == "meta":
                meta = record
            elif kind == "step":
                steps.append(record)
            elif kind == "columns":
                columns = record
    if meta is None:
        raise ValueError(f"'{path}' holds no meta record: not a scaling-probe file")
    return {"meta": meta, "steps": steps, "columns": columns}
