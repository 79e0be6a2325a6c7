"""The update of a bucket, assembled and written (paper eq. 7–12).

* **Assembly**: the rule's contribution (φ, its residual norms, its state), the limiter's factors c,
  and the terms of ``update = P·(a·ψ − κ·coef∘R) + coef∘G`` (or ``coef∘E`` for a rule's explicit
  residual E), with coef = w·c·φ: :func:`residual_coefficients`, :func:`low_rank_term`, and
  :func:`residual_update`, which builds the whole update in the gradient stack (a pure function of
  tensors: it compiles with ``fullgraph=True``).
* **The bucket's step after the refresh**, :func:`bucket_update_`: R = PᵀG, Adam on R (eq. 4–5), the
  assembly and the write. With ``capturable=True`` every input that changes from step to step is a
  tensor (step counts, lr, the finiteness flag ``keep``): it compiles with ``fullgraph=True``.
* **Writing**, W ← W·(1 − ηλ) − η·update: :func:`write_matrix_` for a lone matrix (two passes over W,
  no m×n temporary), :func:`write_stacked_` for everything else — a stack of matrices, the layer-wise
  mode's masked matrix (``keep``), and bf16 weights written by stochastic rounding (``weights.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import inner_adam, sharding, weights
from .limiter import Limiter
from .projector import add_back_, add_projected_back_, project, project_back
from .residual import Bucket, Contribution, Rule


@dataclass(frozen=True)
class AdamOptions:
    """A group's Adam hyperparameters (constants of a compiled bucket step)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    convention: str

    @classmethod
    def of(cls, group: dict) -> "AdamOptions":
        beta1, beta2 = group["betas"]
        return cls(beta1, beta2, group["eps"], group["weight_decay"], group["adam_convention"])


def bucket_update_(rule: Rule, limiter: Limiter, options: dict, side: str, adam: AdamOptions,
                   params: list[torch.Tensor], grads: torch.Tensor, left, right, exp_avgs: list, exp_avg_sqs: list,
                   adam_steps: list, norms: list, previous, unit_state: dict, lr, keep=None, *,
                   shard: sharding.BucketShard | None = None, after_projection=None, generators=None):
    """One bucket's step once its subspace is set: R = Pᵀ·G, Adam's moments and ψ (eq. 4–5), the
    rule and the limiter (eq. 7–12), and W ← W·decay − η·update, in place.

    ``exp_avgs``/``exp_avg_sqs`` are the store's working moments (updated in place); ``adam_steps``
    ints or 0-d device tensors; ``lr`` a float or a 0-d tensor; ``keep`` (0-d bool, G zero where it
    is false): when false nothing changes. ``after_projection(low)`` sees R first (FSDP2's column
    reduce-scatter is done before; pre-projection transforms, the convergence trigger's norms).
    ``generators``: stochastic rounding. Returns (kept norms, factors, ‖S‖², the rule's new state),
    each None where the rule has none."""
    single = grads.shape[0] == 1
    low = project(grads, left, right)
    if shard is not None and shard.columns_sharded:  # Σ_k P_kᵀ·G_k, this rank's columns
        low = shard.reduce_scatter_columns(low)
    if after_projection is not None:
        after_projection(low)
    lows = list(low.unbind(0))
    mixed = exp_avgs[0].dtype != low.dtype  # 8-bit moments are worked on in fp32
    if mixed:
        lows = [r.to(exp_avgs[0].dtype) for r in lows]
    inner_adam.update_moments_(exp_avgs, exp_avg_sqs, lows, beta1=adam.beta1, beta2=adam.beta2, foreach=True,
                               keep=keep)
    directions = inner_adam.directions(exp_avgs, exp_avg_sqs, adam_steps, beta1=adam.beta1, beta2=adam.beta2,
                                       eps=adam.eps, foreach=True, convention=adam.convention)
    if mixed:
        directions = [d.to(low.dtype) for d in directions]
    psi = directions[0].unsqueeze(0) if single else torch.stack(directions)
    decay = 1.0 - lr * adam.weight_decay
    # transformers' order W ← (W − η·c·u)·decay, written as W·decay − η·c·decay·u
    late_decay = decay if adam.convention == "transformers" else 1.0
    step_sizes = [lr * c * late_decay
                  for c in inner_adam.step_factors(adam_steps, adam.beta1, adam.beta2, adam.convention)]
    scalars = not isinstance(lr, torch.Tensor) and not inner_adam.on_device(adam_steps)
    if single and keep is None and generators is None and scalars:  # one matrix: straight into the weight
        contribution, coef, kept, factors = residual_coefficients(
            rule, limiter, options, side, grads, low, psi, norms, previous, shard, left, right, unit_state)
        term, a = low_rank_term(contribution, coef, low, psi)
        if shard is not None:
            term, coef = shard.gather_terms(term, coef, rule.uses_columns(options))
        write_matrix_(params[0], residual_base(contribution, grads)[0], None if coef is None else coef[0],
                      None if term is None else term[0], a, left, right, step_sizes[0], decay)
        return kept, factors, contribution.residual_sq, contribution.state
    update, kept, factors, residual_sq, new_state = residual_update(
        rule, limiter, options, side, grads, low, psi, norms, previous, left, right, unit_state, shard)
    write_stacked_(params, update, step_sizes, decay, keep, generators)
    return kept, factors, residual_sq, new_state


def residual_coefficients(rule: Rule, limiter: Limiter, options: dict, side: str, grads: torch.Tensor,
                          low: torch.Tensor, psi: torch.Tensor, grad_norms: list, previous: torch.Tensor | None,
                          shard: sharding.BucketShard | None = None, left=None, right=None,
                          unit_state: dict | None = None):
    """The rule's contribution (φ, ‖S‖, its state) and the limiter's factors c (eq. 8–12): returns
    (contribution, coef = c·w·φ in the gradients' dtype or None, kept norms or None, factors or None).
    ``unit_state``: the rule's declared state, stacked over the bucket."""
    contribution = rule.contribution(Bucket(grads, low, psi, side, grad_norms, shard, left, right, unit_state), options)
    factors = kept = None
    if contribution.phi is None:
        return contribution, None, None, None
    coef = contribution.phi
    if contribution.residual_sq is not None:
        norms = contribution.residual_sq.sqrt()
        factors, kept = limiter.factors(norms, previous if previous.dtype == norms.dtype else previous.to(norms.dtype),
                                        options)
        if factors is not None:
            coef = coef * factors.view(-1, 1, 1)
    if contribution.weight != 1.0:
        coef = coef * contribution.weight
    if coef.dtype != grads.dtype:
        coef = coef.to(grads.dtype)
    return contribution, coef, kept, factors


def low_rank_term(contribution: Contribution, coef: torch.Tensor | None, low: torch.Tensor, psi: torch.Tensor):
    """(A, a) with update = a·P·A + coef∘G: A = ψ − (κ/a)·coef∘R, or (coef∘R, −κ) when a = 0, or
    (None, 0) when there is no subspace term. ``psi`` and ``low`` are overwritten."""
    a, kappa = contribution.subspace_scale, contribution.kappa
    if a != 0.0:  # P·(a·ψ − κ·coef∘R) = a·P·(ψ − (κ/a)·coef∘R)
        return (psi.addcmul_(low, coef, value=-kappa / a) if coef is not None and kappa != 0.0 else psi), a
    if coef is not None and kappa != 0.0:
        return low.mul_(coef), -kappa
    return None, 0.0


def residual_update(rule: Rule, limiter: Limiter, options: dict, side: str, grads: torch.Tensor,
                    low: torch.Tensor, psi: torch.Tensor, grad_norms: list, previous: torch.Tensor | None,
                    left: torch.Tensor | None, right: torch.Tensor | None,
                    unit_state: dict | None = None, shard: sharding.BucketShard | None = None):
    """The steady step of a stacked bucket after Adam: :func:`residual_coefficients`, then the update
    P·(a·ψ − κ·coef∘R) + coef∘G of every matrix assembled in the gradient stack (eq. 7–12).

    Returns (update, kept norms or None, factors or None, ‖S‖² before the limiter or None, the rule's
    new state or None). A pure
    function of tensors, with the units and options bound by :func:`bucket_update_` (which
    ``GroupPlan.bucket_update`` compiles with ``fullgraph=True`` when ``compile=True``). ``grads``,
    ``psi`` and ``low`` are overwritten. ``shard``: the bucket's collectives on FSDP2 shards (eager only).
    """
    contribution, coef, kept, factors = residual_coefficients(rule, limiter, options, side, grads, low, psi,
                                                              grad_norms, previous, shard, left, right, unit_state)
    term, a = low_rank_term(contribution, coef, low, psi)
    if shard is not None:
        term, coef = shard.gather_terms(term, coef, rule.uses_columns(options))
    if coef is None:
        return project_back(term.mul_(a), left, right), None, None, None, contribution.state
    update = residual_base(contribution, grads).mul_(coef)
    if term is not None:
        add_back_(update, term, left, right, alpha=a)
    return update, kept, factors, contribution.residual_sq, contribution.state


def residual_base(contribution: Contribution, grads: torch.Tensor) -> torch.Tensor:
    """What coef multiplies: G (the residual is φ∘(G − κ·P·R), its P·R part folded into the subspace
    term), or the rule's explicit residual (``Contribution.explicit``, e.g. FRUGAL's sign)."""
    return grads if contribution.explicit is None else contribution.explicit


def write_matrix_(param: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor | None, term: torch.Tensor | None,
                  a: float, left, right, step_size: float, decay: float) -> None:
    """W ← W·decay − η·(a·back(term) + coef∘G) for one matrix, in two passes over W: one ``addmm_``
    (with the decay as its β) and one ``addcmul_`` — no m×n temporary."""
    left = None if left is None else left[0]
    right = None if right is None else right[0]
    if term is not None:
        add_projected_back_(param, term, left, right, alpha=-step_size * a, beta=decay)
    elif decay != 1.0:
        param.mul_(decay)
    if coef is not None:
        param.addcmul_(grad, coef, value=-step_size)


def write_stacked_(params: list[torch.Tensor], update: torch.Tensor, step_sizes: list, decay,
                   keep: torch.Tensor | None = None, generators: list | None = None) -> None:
    """W_b ← W_b·decay − η_b·update_b for every matrix of the stack. ``step_sizes`` are floats or 0-d
    device tensors, ``decay`` a float or a 0-d tensor (a tensor ``lr``). ``keep`` (a 0-d bool on the
    device: the layer-wise mode and ``capturable=True``; the update finite): when false every W stays
    as it was. ``generators``: the weights are bf16 written by stochastic rounding (fp32 copies
    updated, then rounded back, one generator per matrix)."""
    step_size = inner_adam.per_matrix(step_sizes, update)
    if isinstance(step_size, torch.Tensor):  # B×1×1: the product is taken in fp32 and above
        update.mul_(step_size if keep is None else step_size * keep)
        step_size = 1.0
    elif keep is not None:
        update.mul_(keep)
    targets = params
    if generators is not None:
        params = weights.fp32_copies(params)
    if isinstance(decay, torch.Tensor) or decay != 1.0:
        torch._foreach_mul_(params, decay if keep is None else torch.where(keep, decay, 1.0))
    torch._foreach_add_(params, list(update.unbind(0)), alpha=-step_size)
    if generators is not None:
        weights.write_back_(targets, params, generators)
