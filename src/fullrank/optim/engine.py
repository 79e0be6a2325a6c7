"""``SubspaceAdamW``: one optimizer for GaLore, Fira and their ablations.

A param group with a ``rank`` key is *projected*; its 2-D weights get (paper eq. 2–12)::

    every update_proj_gap steps:  P ← top-r singular vectors of G        (projector, eq. 2)
    R = Pᵀ·G                                                              (eq. 2)
    ψ(R) = Adam's correction of R, moments kept at r×n                    (inner Adam, eq. 4–5)
    S = c · φ(R) ∘ (G − P·R)                                              (residual rule × limiter, eq. 8–12)
    W ← W·(1 − η·λ) − η·(α·P·ψ(R) + S)                                    (eq. 7, decoupled decay)

Every other group is plain AdamW. The four parts live in ``svd.py``/``projector.py`` (or
``random_proj.py``), ``inner_adam.py``, ``residual.py`` and ``limiter.py``; ``switch.py`` says what
the moments do when P changes, ``refresh.py`` when P changes, ``rank.py`` at which rank. Presets
(``Fira``, ``GaLore``, ``AdaRankGrad``, ``FiraAdaptive``, ``APOLLO``, ``APOLLO_Mini``, the ablations)
only choose options.

The step is atomic with respect to non-finite gradients: they are checked for every parameter
before anything is written. It synchronises with the device once, for that check (which also
reads the convergence flags of ``refresh.py``), plus once more on a step where subspaces of an
adaptive-rank group are recomputed, to read all their new ranks together (a rank sizes the state,
so the host must know it). The optimizer state holds tensors and plain numbers only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from . import inner_adam, random_proj
from .limiter import STATE_KEY as LIMITER_STATE_KEY
from .limiter import limit_factor
from .options import validate_common, validate_projected, validate_projected_state
from .projector import (
    add_projected_back_,
    compute_projection,
    low_rank_shape,
    project,
    projection_side,
    truncated_projection,
)
from .random_proj import SEED_KEY, gaussian_projection, orthonormal_random_projection, stores_seed_only
from .rank import current_rank, energy_rank, is_adaptive, rank_bounds, summarize
from .refresh import ENERGY_KEY, LAST_REFRESH_KEY, captured_energy, converged_flag, record_energy_, refresh_due
from .refresh import uses_trigger
from .residual import norm_dtype, scaled_residual
from .svd import top_singular_vectors
from .switch import switch_moments_

# State scalars whose dtype is their own (≥ fp32), not the parameter's: load_state_dict keeps it.
_OWN_DTYPE_KEYS = (LIMITER_STATE_KEY, ENERGY_KEY)


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or ±inf; nothing was updated."""


def is_projected(group: dict) -> bool:
    """A group is projected when it carries a rank, as in GaLore's param groups."""
    return group.get("rank") is not None


def parameter_names(group: dict, offset: int = 0) -> list[str]:
    """The group's ``param_names`` or positional names ``param <k>``."""
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"param {offset + k}" for k in range(len(group["params"]))]


@dataclass
class _Refresh:
    """A subspace being recomputed: the new projection, or the factors and the rank still to be read."""

    group: dict
    state: dict
    grad: torch.Tensor
    side: str
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    factors: tuple[torch.Tensor | None, torch.Tensor | None] | None = None  # (U, Vh) at max_rank, adaptive
    rank: torch.Tensor | int | None = None
    seed: int | None = None


class SubspaceAdamW(Optimizer):
    """AdamW in a low-rank gradient subspace, with a rule for the residual outside it.

    Args:
        params: parameters or param groups; groups holding ``rank`` are projected.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, scaled by lr).
        update_proj_gap: T, steps between projection refreshes (refreshed at step 0, T, 2T, …).
        scale: α, GaLore's scale on P·ψ(R).
        proj_type: ``std`` | ``reverse_std`` | ``left`` | ``right`` | ``full`` (GaLore's meaning).
        residual: ``discard`` | ``add`` | ``scale_matrix`` | ``scale_column`` | ``only_scaling``.
        limiter: ``none`` | ``norm_growth`` | ``clip``.
        gamma: γ ≥ 1 of the norm-growth limiter (eq. 12).
        clip_threshold: τ > 0 of the ``clip`` limiter.
        residual_convention: ``exact`` (G − P·R) or ``official`` (G − α·P·R, the fira package's).
        svd: ``exact`` (fp32 ``torch.linalg.svd``) or ``randomized`` (Halko et al.).
        oversample, power_iters: randomized SVD's sketch oversampling and power iterations.
        on_switch: ``keep`` | ``reproject`` | ``reset``: Adam's moments when P changes.
        reset_limiter_on_switch: forget the limiter's previous norm when P changes.
        projector: ``svd`` (P from the gradient's singular vectors, ``svd`` picks the backend) or
            ``random`` (a seeded random P: APOLLO's Gaussian sketch, stored as its seed, for
            ``only_scaling``; GoLore's orthonormal basis otherwise). See ``random_proj.py``.
        rank_energy: η in (0, 1]: AdaRankGrad's adaptive rank, the smallest r whose truncation keeps
            η of ‖G‖²_F, chosen per matrix at every refresh (``rank.py``); None: the fixed ``rank``.
        min_rank, max_rank: bounds of the adaptive rank; ``max_rank`` defaults to the group's
            ``rank`` (the state budget) and is capped by each matrix's min(m, n).
        refresh_threshold: τ in [0, 1): also refresh a subspace once the moving average of the
            share of ‖G‖²_F it captures falls below τ (AdaRankGrad's convergence-triggered refresh,
            ``refresh.py``), ``update_proj_gap`` then being an upper bound on the gap; 0: off.
        refresh_beta: β in [0, 1) of that moving average.
        scaling_granularity: ``column`` (eq. 11; APOLLO's channel-wise) or ``tensor`` (eq. 10;
            APOLLO-Mini's tensor-wise) factor φ of ``only_scaling``.
        scaling_multiplier: multiplies the limited ``only_scaling`` update c·φ∘G (APOLLO's √scale);
            other rules ignore it.
        adam_convention: ``torch`` (torch.optim.AdamW's bias correction and ε) or ``transformers``
            (the official GaLore/Fira/APOLLO packages': c_t folded into the step size after the
            limiter, ε added to √V, decay after the update); see ``inner_adam.py``.
        seed: seeds the randomized SVD and the random projector (per parameter and step, so
            resumed runs repeat them).
        nonfinite: ``raise`` (default) or ``skip`` the whole step when a gradient is NaN/inf;
            skipped steps are counted in ``skipped_steps``.
        foreach: use ``torch._foreach_*`` kernels; default: when every parameter is on CUDA.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        residual: str = "scale_column",
        limiter: str = "norm_growth",
        gamma: float = 1.01,
        clip_threshold: float = 1.0,
        residual_convention: str = "exact",
        svd: str = "exact",
        oversample: int = 8,
        power_iters: int = 2,
        on_switch: str = "keep",
        reset_limiter_on_switch: bool = False,
        projector: str = "svd",
        rank_energy: float | None = None,
        min_rank: int = 1,
        max_rank: int | None = None,
        refresh_threshold: float = 0.0,
        refresh_beta: float = 0.9,
        scaling_granularity: str = "column",
        scaling_multiplier: float = 1.0,
        adam_convention: str = "torch",
        seed: int = 0,
        nonfinite: str = "raise",
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            residual=residual, limiter=limiter, gamma=gamma, clip_threshold=clip_threshold,
            residual_convention=residual_convention, svd=svd, oversample=oversample,
            power_iters=power_iters, on_switch=on_switch,
            reset_limiter_on_switch=reset_limiter_on_switch, projector=projector,
            rank_energy=rank_energy, min_rank=min_rank, max_rank=max_rank,
            refresh_threshold=refresh_threshold, refresh_beta=refresh_beta,
            scaling_granularity=scaling_granularity, scaling_multiplier=scaling_multiplier,
            adam_convention=adam_convention, seed=seed, nonfinite=nonfinite, foreach=foreach,
        )
        self.skipped_steps = 0
        if not isinstance(params, torch.Tensor):  # torch fills defaults into the caller's dicts: copy them
            params = [dict(p) if isinstance(p, dict) else p for p in params]
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            self._validate_group(group, offset)
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _validate_group(group: dict, offset: int) -> None:
        validate_common(group)
        if is_projected(group):
            validate_projected(group, parameter_names(group, offset))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key in _OWN_DTYPE_KEYS:
                value = saved_state.get(saved_id, {}).get(key)
                if value is not None:  # keep its dtype: Optimizer.load_state_dict casts to the param's
                    self.state[param][key] = value.to(device=param.device)
        offset = 0
        for group in self.param_groups:
            self._validate_group(group, offset)
            if is_projected(group):
                for param, name in zip(group["params"], parameter_names(group, offset)):
                    if self.state.get(param):
                        validate_projected_state(self.state[param], param, name, group)
            offset += len(group["params"])
        self.skipped_steps = skipped

    # ------------------------------------------------------------------ ranks
    def current_ranks(self) -> dict[str, int]:
        """{parameter name: rank its state is allocated at} for every projected matrix stepped so far."""
        ranks, offset = {}, 0
        for group in self.param_groups:
            if is_projected(group):
                for param, name in zip(group["params"], parameter_names(group, offset)):
                    state = self.state.get(param)
                    if not state:
                        continue
                    rank = current_rank(state, projection_side(group["proj_type"], tuple(param.shape)))
                    if rank is not None:
                        ranks[name] = rank
            offset += len(group["params"])
        return ranks

    def rank_summary(self) -> dict:
        """``dict(min=, median=, max=, mean=, ranks={name: r})`` over the projected matrices.

        Ranks are read from the state's shapes: no device synchronisation, cheap enough for every
        step. The statistics are None before the first step.
        """
        return summarize(self.current_ranks())

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        finite, flagged, grad_norms = self._synchronize(work)
        if not finite:
            self.skipped_steps += 1
            return loss
        refreshed = self._refresh_projections(work, flagged)
        for group, items in work:
            if items:
                foreach = group["foreach"]
                if foreach is None:
                    foreach = all(p.is_cuda for _, p, _, _ in items)
                if is_projected(group):
                    self._projected_step(group, items, foreach, refreshed, grad_norms)
                else:
                    self._plain_step(group, items, foreach)
        return loss

    def _gather(self) -> list[tuple[dict, list]]:
        """(group, [(ordinal, param, grad, name)]) for every parameter that has a gradient.

        The ordinal (which seeds the randomized SVD and the random projector) is the parameter's
        position over all groups, counted from the group's ``param_ordinal`` when it has one: the
        layer-wise mode sets it, so one optimizer per parameter draws what one optimizer over all
        of them would.
        """
        work, offset = [], 0
        for group in self.param_groups:
            items, first = [], group.get("param_ordinal", offset)
            for k, (param, name) in enumerate(zip(group["params"], parameter_names(group, offset))):
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise ValueError(f"parameter {name!r} has a sparse gradient; SubspaceAdamW needs dense gradients")
                    items.append((first + k, param, param.grad, name))
            offset += len(group["params"])
            work.append((group, items))
        return work

    def _synchronize(self, work) -> tuple[bool, set[int], dict[int, torch.Tensor]]:
        """Whether every gradient is finite, the ids of the parameters whose subspace asked for a
        refresh (``refresh.py``), read in one transfer per device before anything is written, and
        each gradient's 2-norm on its device (by parameter id), which the step reuses."""
        grads: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        flags: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for group, items in work:
            for _, param, grad, _ in items:
                grads.setdefault(grad.device, []).append((id(param), grad))
                state = self.state.get(param)
                flag = converged_flag(group, state) if state and is_projected(group) else None
                if flag is not None:
                    flags.setdefault(flag.device, []).append((id(param), flag))
        finite, flagged, grad_norms = True, set(), {}
        for device in grads.keys() | flags.keys():
            values = []
            if device in grads:
                norms = torch._foreach_norm([g for _, g in grads[device]], 2)
                grad_norms.update((pid, norm) for (pid, _), norm in zip(grads[device], norms))
                # a finite 2-norm proves every entry finite (NaN and ±inf propagate through the sum of
                # squares); torch's CPU ∞-norm is ~20× slower. Only an overflowing sum of huge finite
                # entries tests non-finite here, and the exact check below then clears it.
                values.append(torch.isfinite(torch.stack(norms)).all())
            owners = flags.get(device, [])
            read = torch.stack(values + [flag for _, flag in owners]).tolist()
            if device in grads:
                finite = finite and read.pop(0)
            flagged.update(pid for (pid, _), hit in zip(owners, read) if hit)
        if finite:
            return True, flagged, grad_norms
        entries = [(g, name, group) for group, items in work for _, _, g, name in items]
        bad = next(((n, grp) for g, n, grp in entries if not bool(torch.isfinite(g).all())), None)
        if bad is None:  # the 2-norm overflowed on finite gradients
            return True, flagged, grad_norms
        bad_name, bad_group = bad
        if bad_group["nonfinite"] == "skip":
            return False, set(), {}
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in parameter {bad_name!r}; no weight or optimizer state "
            "was changed. Use nonfinite='skip' to skip such steps instead."
        )

    def _plain_step(self, group: dict, items: list, foreach: bool) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for _, param, grad, _ in items:
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        inner_adam.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], foreach=foreach,
            convention=group["adam_convention"],
        )

    def _projection(self, group: dict, state: dict, grad: torch.Tensor):
        """(proj_left, proj_right) of a matrix: from the state, or regenerated from its seed."""
        seed = state.get(SEED_KEY)
        if seed is None:
            return state.get("proj_left"), state.get("proj_right")
        side = projection_side(group["proj_type"], tuple(grad.shape))
        return gaussian_projection(tuple(grad.shape), side, group["rank"], seed, grad.device, grad.dtype)

    def _projected_step(self, group: dict, items: list, foreach: bool, refreshed: set[int],
                        grad_norms: dict[int, torch.Tensor]) -> None:
        lows, projections = [], []
        for _, param, grad, _ in items:
            state = self.state[param]
            left, right = self._projection(group, state, grad)
            projections.append((left, right))
            lows.append(project(grad, left, right))
            state["step"] += 1
            state["adam_step"] += 1

        states = [self.state[param] for _, param, _, _ in items]
        if uses_trigger(group):
            for (_, param, grad, _), state, low in zip(items, states, lows):
                energy = captured_energy(grad, low, grad_norms.get(id(param)))
                record_energy_(state, energy, id(param) in refreshed, group["refresh_beta"])
        beta1, beta2 = group["betas"]
        convention = group["adam_convention"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        adam_steps = [s["adam_step"] for s in states]
        inner_adam.update_moments_(exp_avgs, exp_avg_sqs, lows, beta1=beta1, beta2=beta2, foreach=foreach)
        psis = inner_adam.directions(
            exp_avgs, exp_avg_sqs, adam_steps, beta1=beta1, beta2=beta2, eps=group["eps"], foreach=foreach,
            convention=convention,
        )
        step_factors = inner_adam.step_factors(adam_steps, beta1, beta2, convention)

        lr, alpha, rule = group["lr"], group["scale"], group["residual"]
        decay = 1.0 - lr * group["weight_decay"]
        # transformers' order W ← (W − η·c·u)·decay, written as W·decay − η·c·decay·u
        late_decay = decay if convention == "transformers" else 1.0
        kappa = alpha if group["residual_convention"] == "official" else 1.0
        for (_, param, grad, _), state, low, psi, (left, right), c_t in zip(
            items, states, lows, psis, projections, step_factors
        ):
            step_lr = lr * c_t * late_decay  # = lr exactly under the torch convention
            side = projection_side(group["proj_type"], tuple(grad.shape))
            residual = scaled_residual(rule, grad, low, psi, side, kappa, group["scaling_granularity"],
                                       grad_norms.get(id(param)))
            if residual is None:  # GaLore: W ← W·decay − η·α·P·ψ(R)
                add_projected_back_(param, psi, left, right, alpha=-step_lr * alpha, beta=decay)
                continue
            factor = limit_factor(
                group["limiter"], residual.norm, state,
                gamma=group["gamma"], clip_threshold=group["clip_threshold"],
            )
            coef = residual.phi if factor is None else residual.phi * factor
            if rule == "only_scaling":  # W ← W·decay − η·β·c·φ∘G   (APOLLO: β = √scale)
                if decay != 1.0:
                    param.mul_(decay)
                param.addcmul_(grad, coef.to(grad.dtype), value=-step_lr * group["scaling_multiplier"])
                continue
            # W ← W·decay − η·P·(α·ψ − c·κ·φ∘R) − η·c·φ∘G
            low_term = low * (coef * kappa).to(low.dtype)
            add_projected_back_(param, psi.mul(alpha).sub_(low_term), left, right, alpha=-step_lr, beta=decay)
            param.addcmul_(grad, coef.to(grad.dtype), value=-step_lr)

    # ------------------------------------------------------------------ refresh
    def _refresh_projections(self, work, flagged: set[int]) -> set[int]:
        """Recompute the subspaces that are due (``refresh.py``) and carry the moments over
        (``on_switch``); returns the ids of the parameters refreshed. Adaptive ranks are read from the
        device together, once per step that needs them."""
        pending: list[_Refresh] = []
        refreshed = set()
        for group, items in work:
            if not is_projected(group):
                continue
            for ordinal, param, grad, _ in items:
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["adam_step"] = 0
                    state[LIMITER_STATE_KEY] = torch.zeros((), dtype=norm_dtype(param.dtype), device=param.device)
                if refresh_due(group, state, id(param) in flagged):
                    pending.append(self._new_projection(group, ordinal, grad, state))
                    refreshed.add(id(param))
        by_device: dict[torch.device, list[_Refresh]] = {}
        for refresh in pending:
            if isinstance(refresh.rank, torch.Tensor):
                by_device.setdefault(refresh.rank.device, []).append(refresh)
        for refreshes in by_device.values():
            for refresh, rank in zip(refreshes, torch.stack([r.rank for r in refreshes]).tolist()):
                refresh.rank = int(rank)
        for refresh in pending:
            self._install(refresh)
        return refreshed

    def _svd_generator(self, group: dict, ordinal: int, grad: torch.Tensor, state: dict) -> torch.Generator | None:
        if group["svd"] != "randomized":
            return None
        generator = torch.Generator(device=grad.device)
        generator.manual_seed(random_proj.projection_seed(group["seed"], ordinal, state["step"]))
        return generator

    def _new_projection(self, group: dict, ordinal: int, grad: torch.Tensor, state: dict) -> _Refresh:
        """The new subspace of a matrix, computed from its current gradient (nothing written yet)."""
        shape = tuple(grad.shape)
        refresh = _Refresh(group, state, grad, projection_side(group["proj_type"], shape))
        if group["projector"] == "random":
            seed = random_proj.projection_seed(group["seed"], ordinal, state["step"])
            if stores_seed_only(group):
                refresh.seed = seed
            else:
                refresh.left, refresh.right = orthonormal_random_projection(
                    shape, refresh.side, group["rank"], seed, grad.device, grad.dtype
                )
            return refresh
        options = dict(oversample=group["oversample"], power_iters=group["power_iters"],
                       generator=self._svd_generator(group, ordinal, grad, state))
        if not is_adaptive(group):
            refresh.left, refresh.right, _ = compute_projection(
                grad, group["rank"], refresh.side, group["svd"], **options
            )
            return refresh
        low, high = rank_bounds(group, shape)
        U, S, Vh = top_singular_vectors(grad, high, group["svd"], **options)
        total = torch.linalg.vector_norm(grad, dtype=S.dtype).square()
        # only the factor the projection uses waits for the rank
        refresh.factors = (U if refresh.side != "right" else None, Vh if refresh.side != "left" else None)
        refresh.rank = energy_rank(S, total, group["rank_energy"], low, high)
        return refresh

    def _install(self, refresh: _Refresh) -> None:
        """Write the new projection into the state and carry the moments over (``on_switch``)."""
        group, state, grad, side = refresh.group, refresh.state, refresh.grad, refresh.side
        if refresh.factors is not None:
            refresh.left, refresh.right = truncated_projection(*refresh.factors, refresh.rank, side, grad.dtype)
        if refresh.seed is not None:
            m, n = grad.shape
            r = group["rank"]
            low_shape = torch.Size((r if side in ("left", "both") else m, r if side in ("right", "both") else n))
        else:
            low_shape = low_rank_shape(tuple(grad.shape), refresh.left, refresh.right)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(low_shape, dtype=grad.dtype, device=grad.device)
            state["exp_avg_sq"] = torch.zeros(low_shape, dtype=grad.dtype, device=grad.device)
        else:
            switch_moments_(state, group["on_switch"], refresh.left, refresh.right, low_shape)
            if group["reset_limiter_on_switch"]:
                state[LIMITER_STATE_KEY] = torch.zeros_like(state[LIMITER_STATE_KEY])
        for key, value in (("proj_left", refresh.left), ("proj_right", refresh.right), (SEED_KEY, refresh.seed)):
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        if uses_trigger(group):
            state[LAST_REFRESH_KEY] = state["step"]
