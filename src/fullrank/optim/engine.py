"""``SubspaceAdamW``: one optimizer for GaLore, Fira and their ablations.

A param group with a ``rank`` key is *projected*; its 2-D weights get (paper eq. 2–12)::

    every update_proj_gap steps:  P ← top-r singular vectors of G        (projector, eq. 2)
    R = Pᵀ·G                                                              (eq. 2)
    ψ(R) = Adam's correction of R, moments kept at r×n                    (inner Adam, eq. 4–5)
    S = c · φ(R) ∘ (G − P·R)                                              (residual rule × limiter, eq. 8–12)
    W ← W·(1 − η·λ) − η·(α·P·ψ(R) + S)                                    (eq. 7, decoupled decay)

Every other group is plain AdamW. The four parts live in ``svd.py``/``projector.py``,
``inner_adam.py``, ``residual.py`` and ``limiter.py``; ``switch.py`` says what the moments do when P
changes. Presets (``Fira``, ``GaLore``, the ablations) only choose options.

The step is atomic with respect to non-finite gradients: they are checked for every parameter
before anything is written. The optimizer state holds tensors and plain numbers only.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from . import inner_adam
from .limiter import STATE_KEY as LIMITER_STATE_KEY
from .limiter import limit_factor
from .options import validate_common, validate_projected, validate_projected_state
from .projector import add_projected_back_, compute_projection, low_rank_shape, project, projection_side
from .residual import norm_dtype, scaled_residual
from .switch import switch_moments_

_SEED_STRIDE = 1_000_003


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
        seed: seeds the randomized SVD (per parameter and step, so resumed runs repeat it).
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
            reset_limiter_on_switch=reset_limiter_on_switch, seed=seed, nonfinite=nonfinite,
            foreach=foreach,
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
            norm = saved_state.get(saved_id, {}).get(LIMITER_STATE_KEY)
            if norm is not None:  # keep its dtype: Optimizer.load_state_dict casts to the param's
                self.state[param][LIMITER_STATE_KEY] = norm.to(device=param.device)
        offset = 0
        for group in self.param_groups:
            self._validate_group(group, offset)
            if is_projected(group):
                for param, name in zip(group["params"], parameter_names(group, offset)):
                    if self.state.get(param):
                        validate_projected_state(self.state[param], param, name, group["rank"])
            offset += len(group["params"])
        self.skipped_steps = skipped

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        if not self._gradients_finite(work):
            self.skipped_steps += 1
            return loss
        for group, items in work:
            if items:
                foreach = group["foreach"]
                if foreach is None:
                    foreach = all(p.is_cuda for _, p, _, _ in items)
                if is_projected(group):
                    self._projected_step(group, items, foreach)
                else:
                    self._plain_step(group, items, foreach)
        return loss

    def _gather(self) -> list[tuple[dict, list]]:
        """(group, [(ordinal, param, grad, name)]) for every parameter that has a gradient."""
        work, ordinal = [], 0
        for group in self.param_groups:
            items = []
            for param, name in zip(group["params"], parameter_names(group, ordinal)):
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise ValueError(f"parameter {name!r} has a sparse gradient; SubspaceAdamW needs dense gradients")
                    items.append((ordinal, param, param.grad, name))
                ordinal += 1
            work.append((group, items))
        return work

    def _gradients_finite(self, work) -> bool:
        """Check every gradient before any write (one reduction per tensor, one sync per device)."""
        entries = [(g, name, group) for group, items in work for _, _, g, name in items]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g, _, _ in entries:
            by_device.setdefault(g.device, []).append(g)
        if all(
            bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())
            for grads in by_device.values()
        ):
            return True
        bad_name, bad_group = next((n, grp) for g, n, grp in entries if not bool(torch.isfinite(g).all()))
        if bad_group["nonfinite"] == "skip":
            return False
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
        )

    def _projected_step(self, group: dict, items: list, foreach: bool) -> None:
        lows = []
        for ordinal, param, grad, _ in items:
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["adam_step"] = 0
                state[LIMITER_STATE_KEY] = torch.zeros((), dtype=norm_dtype(param.dtype), device=param.device)
            if state["step"] % group["update_proj_gap"] == 0:
                self._refresh_projection(group, ordinal, grad, state)
            lows.append(project(grad, state.get("proj_left"), state.get("proj_right")))
            state["step"] += 1
            state["adam_step"] += 1

        states = [self.state[param] for _, param, _, _ in items]
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        inner_adam.update_moments_(exp_avgs, exp_avg_sqs, lows, beta1=beta1, beta2=beta2, foreach=foreach)
        psis = inner_adam.directions(
            exp_avgs, exp_avg_sqs, [s["adam_step"] for s in states],
            beta1=beta1, beta2=beta2, eps=group["eps"], foreach=foreach,
        )

        lr, alpha, rule = group["lr"], group["scale"], group["residual"]
        decay = 1.0 - lr * group["weight_decay"]
        kappa = alpha if group["residual_convention"] == "official" else 1.0
        for (_, param, grad, _), state, low, psi in zip(items, states, lows, psis):
            left, right = state.get("proj_left"), state.get("proj_right")
            side = projection_side(group["proj_type"], tuple(grad.shape))
            residual = scaled_residual(rule, grad, low, psi, side, kappa)
            if residual is None:  # GaLore: W ← W·decay − η·α·P·ψ(R)
                add_projected_back_(param, psi, left, right, alpha=-lr * alpha, beta=decay)
                continue
            factor = limit_factor(
                group["limiter"], residual.norm, state,
                gamma=group["gamma"], clip_threshold=group["clip_threshold"],
            )
            coef = residual.phi if factor is None else residual.phi * factor
            if rule == "only_scaling":  # W ← W·decay − η·c·φ∘G
                if decay != 1.0:
                    param.mul_(decay)
            else:  # W ← W·decay − η·P·(α·ψ − c·κ·φ∘R) − η·c·φ∘G
                low_term = low * (coef * kappa).to(low.dtype)
                add_projected_back_(param, psi.mul(alpha).sub_(low_term), left, right, alpha=-lr, beta=decay)
            param.addcmul_(grad, coef.to(grad.dtype), value=-lr)

    def _refresh_projection(self, group: dict, ordinal: int, grad: torch.Tensor, state: dict) -> None:
        """Recompute P from the current gradient and carry the moments over (``on_switch``)."""
        side = projection_side(group["proj_type"], tuple(grad.shape))
        generator = None
        if group["svd"] == "randomized":
            generator = torch.Generator(device=grad.device)
            generator.manual_seed(((group["seed"] * _SEED_STRIDE + ordinal) * _SEED_STRIDE + state["step"]) % 2**63)
        left, right, _ = compute_projection(
            grad, group["rank"], side, group["svd"],
            oversample=group["oversample"], power_iters=group["power_iters"], generator=generator,
        )
        low_shape = low_rank_shape(tuple(grad.shape), left, right)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(low_shape, dtype=grad.dtype, device=grad.device)
            state["exp_avg_sq"] = torch.zeros(low_shape, dtype=grad.dtype, device=grad.device)
        else:
            switch_moments_(state, group["on_switch"], left, right, low_shape)
            if group["reset_limiter_on_switch"]:
                state[LIMITER_STATE_KEY] = torch.zeros_like(state[LIMITER_STATE_KEY])
        for key, value in (("proj_left", left), ("proj_right", right)):
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
