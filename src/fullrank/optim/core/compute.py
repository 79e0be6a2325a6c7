"""A bucket's step once its subspace is set, as a pure function: one record in (:class:`BucketInput`),
one record out (:class:`BucketResult`), no callback, nothing written but the working moments that the
store lends it (the stored tensors themselves for 32-bit moments, updated in place).

    R = Pᵀ·G                                                   (eq. 2; FSDP2: reduce-scattered)
    ψ(R) from Adam's moments of R                              (eq. 4–5)
    φ, ‖S‖ from the rule; c from the limiter                   (eq. 8–12)
    update = P·(a·ψ − κ·coef∘R) + coef∘G,   coef = w·c·φ       (or coef∘E for a rule's explicit E)

The update is returned factored for a lone matrix (:class:`units.weights.FactoredUpdate`: the writer
takes two passes over W, no m×n temporary) and assembled in the gradient stack otherwise. With
``capturable=True`` every input that changes from step to step is a tensor (step counts, lr, the
flag ``keep``): ``run_bucket`` (the compute and the weights' write) compiles with ``fullgraph=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import shards
from ..base.norms import norm_dtype
from ..base.options import OptionValues
from ..units import adam as inner_adam
from ..units.adam import AdamOptions
from ..units.limiters import Limiter
from ..units.projection import add_back_, project, project_back
from ..units.rules import Bucket, Contribution, Rule
from ..units.transforms import Transform
from ..units.weights import FactoredUpdate, WeightWriter
from .write import write_weights


@dataclass(frozen=True)
class BucketKernel:
    """The constants of a group's bucket step (a compiled step treats them as such)."""

    rule: Rule
    limiter: Limiter
    transform: Transform
    values: OptionValues
    side: str
    adam: AdamOptions
    trigger: bool  # measure ‖R‖ for the convergence trigger's energy


@dataclass
class BucketInput:
    """Everything one bucket's step reads."""

    params: list[torch.Tensor]  # the weights (this rank's part), written by the writer
    grads: torch.Tensor  # G, B×m×n (for one matrix: a view of its gradient)
    projection: tuple  # (P, Q) stacks, None for an unused side
    exp_avgs: list[torch.Tensor]  # the store's working moments, updated in place
    exp_avg_sqs: list[torch.Tensor]
    adam_steps: list  # ints or 0-d device tensors, already advanced
    grad_norms: list  # ‖G‖ per matrix (0-d, ≥ fp32) or None where unknown
    unit_state: dict[str, torch.Tensor]  # the stepped units' declared state, stacked (B×…)
    lr: float | torch.Tensor
    writer: WeightWriter  # how the weights are written (units/weights.py)
    keep: torch.Tensor | None = None  # 0-d bool (G zero where false): when false nothing changes
    shard: shards.BucketShard | None = None  # the bucket's collectives on FSDP2 shards
    generators: list | None = None  # the writer's random generators (stochastic rounding)


@dataclass
class BucketResult:
    """What a bucket's step returns: the update, and every unit's new state."""

    update: FactoredUpdate | torch.Tensor  # a lone matrix's terms, or the stacked update (B×m×n)
    step_sizes: list  # η·c_t per matrix (floats or 0-d tensors)
    decay: float | torch.Tensor  # 1 − ηλ
    unit_state: dict[str, torch.Tensor]  # the new value of every stepped unit's state key, stacked
    residual_sq: torch.Tensor | None = None  # ‖S‖² per matrix before the limiter (statistics)
    factors: torch.Tensor | None = None  # the limiter's c per matrix (statistics)
    low_norms: torch.Tensor | None = None  # ‖R‖ per matrix (the trigger's energy)


def run_bucket(kernel: BucketKernel, inp: BucketInput) -> BucketResult:
    """:func:`compute`, then the weights written by ``inp.writer`` (the unit that ``compile=True``
    compiles). The returned result's update has been applied."""
    result = compute(kernel, inp)
    write_weights(inp, result)
    return result


def compute(kernel: BucketKernel, inp: BucketInput) -> BucketResult:
    """R = Pᵀ·G, Adam's moments and ψ (eq. 4–5), the rule and the limiter (eq. 7–12), and the update."""
    single = inp.grads.shape[0] == 1
    low = project(inp.grads, *inp.projection)
    if inp.shard is not None and inp.shard.columns_sharded:  # Σ_k P_kᵀ·G_k, this rank's columns
        low = inp.shard.reduce_scatter_columns(low)
    new_state = kernel.transform.after(inp.grads, low, inp.projection) if kernel.transform.active else {}
    low_norms = _low_norms(low, inp.shard) if kernel.trigger else None
    psi = _adam_direction(kernel.adam, inp, low, single)
    decay, step_sizes = _step_sizes(kernel.adam, inp)
    scalars = not isinstance(inp.lr, torch.Tensor) and not inner_adam.on_device(inp.adam_steps)
    contribution, coef, factors, limited = coefficients(kernel, inp, low, psi)
    new_state.update(limited)
    if contribution.state:
        new_state.update(contribution.state)
    term, a = low_rank_term(contribution, coef, low, psi)
    if inp.shard is not None:
        term, coef = inp.shard.gather_terms(term, coef, kernel.rule.uses_columns(kernel.values))
    if single and inp.keep is None and inp.writer.in_place and scalars:  # one matrix: straight into the weight
        update = FactoredUpdate(residual_base(contribution, inp.grads)[0], None if coef is None else coef[0],
                                None if term is None else term[0], a, inp.projection, step_sizes[0], decay)
    else:
        update = assemble(contribution, coef, (term, a), inp)
    return BucketResult(update, step_sizes, decay, new_state, contribution.residual_sq, factors, low_norms)


def _low_norms(low: torch.Tensor, shard: shards.BucketShard | None) -> torch.Tensor:
    """‖R_b‖ per matrix (≥ fp32), summed over the ranks' parts on FSDP2 shards."""
    if shard is None:
        return torch.linalg.vector_norm(low, dim=(-2, -1), dtype=norm_dtype(low.dtype))
    return shard.matrix_norms(low).view(-1)


def _adam_direction(adam: AdamOptions, inp: BucketInput, low: torch.Tensor, single: bool) -> torch.Tensor:
    """Adam's moments of R updated in place (masked by ``keep``), and ψ(R) stacked like R (eq. 4–5)."""
    lows = list(low.unbind(0))
    mixed = inp.exp_avgs[0].dtype != low.dtype  # 8-bit moments are worked on in fp32
    if mixed:
        lows = [r.to(inp.exp_avgs[0].dtype) for r in lows]
    inner_adam.update_moments_(inp.exp_avgs, inp.exp_avg_sqs, lows, adam, foreach=True, keep=inp.keep)
    directions = inner_adam.directions(inp.exp_avgs, inp.exp_avg_sqs, inp.adam_steps, adam, foreach=True)
    if mixed:
        directions = [d.to(low.dtype) for d in directions]
    return directions[0].unsqueeze(0) if single else torch.stack(directions)


def _step_sizes(adam: AdamOptions, inp: BucketInput) -> tuple:
    """(decay 1 − ηλ, η·c_t per matrix); transformers' order W ← (W − η·c·u)·decay is written as
    W·decay − η·c·decay·u."""
    decay = 1.0 - inp.lr * adam.weight_decay
    late_decay = decay if adam.convention == "transformers" else 1.0
    return decay, [inp.lr * c * late_decay for c in inner_adam.step_factors(inp.adam_steps, adam)]


def coefficients(kernel: BucketKernel, inp: BucketInput, low: torch.Tensor, psi: torch.Tensor):
    """The rule's contribution (φ, ‖S‖, its state) and the limiter's factors c (eq. 8–12): returns
    (contribution, coef = c·w·φ in the gradients' dtype or None, factors or None, the limiter's new
    state)."""
    bucket = Bucket(inp.grads, low, psi, kernel.side, inp.projection, inp.grad_norms, inp.shard, inp.unit_state)
    contribution = kernel.rule.contribution(bucket, kernel.values)
    if contribution.phi is None:
        return contribution, None, None, {}
    coef, factors, limited = contribution.phi, None, {}
    if contribution.residual_sq is not None:
        state = {key: inp.unit_state[key] for key in kernel.limiter.state}
        factors, limited = kernel.limiter.limit(contribution.residual_sq.sqrt(), state, kernel.values)
        if factors is not None:
            coef = coef * factors.view(-1, 1, 1)
    if contribution.weight != 1.0:
        coef = coef * contribution.weight
    if coef.dtype != inp.grads.dtype:
        coef = coef.to(inp.grads.dtype)
    return contribution, coef, factors, limited


def low_rank_term(contribution: Contribution, coef: torch.Tensor | None, low: torch.Tensor, psi: torch.Tensor):
    """(A, a) with update = a·P·A + coef∘G: A = ψ − (κ/a)·coef∘R, or (coef∘R, −κ) when a = 0, or
    (None, 0) when there is no subspace term. ``psi`` and ``low`` are overwritten."""
    a, kappa = contribution.subspace_scale, contribution.kappa
    if a != 0.0:  # P·(a·ψ − κ·coef∘R) = a·P·(ψ − (κ/a)·coef∘R)
        return (psi.addcmul_(low, coef, value=-kappa / a) if coef is not None and kappa != 0.0 else psi), a
    if coef is not None and kappa != 0.0:
        return low.mul_(coef), -kappa
    return None, 0.0


def assemble(contribution: Contribution, coef: torch.Tensor | None, term: tuple, inp: BucketInput) -> torch.Tensor:
    """The update P·(a·ψ − κ·coef∘R) + coef∘G of every matrix, in the gradient stack (eq. 7–12);
    ``term`` is (A, a) of :func:`low_rank_term`. The gradient stack is overwritten."""
    low_term, a = term
    if coef is None:
        return project_back(low_term.mul_(a), *inp.projection)
    update = residual_base(contribution, inp.grads).mul_(coef)
    if low_term is not None:
        add_back_(update, low_term, *inp.projection, alpha=a)
    return update


def residual_base(contribution: Contribution, grads: torch.Tensor) -> torch.Tensor:
    """What coef multiplies: G (the residual is φ∘(G − κ·P·R), its P·R part folded into the subspace
    term), or the rule's explicit residual (``Contribution.explicit``, e.g. FRUGAL's sign)."""
    return grads if contribution.explicit is None else contribution.explicit
