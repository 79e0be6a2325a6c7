"""Adam's functional core, shared by the projected (low-rank) and the plain parameters.

ψ is Adam's correction of the paper (eq. 4–5), written as ``torch.optim.AdamW`` computes it::

    M ← β1·M + (1 − β1)·R            V ← β2·V + (1 − β2)·R²
    ψ(R) = (M / (1 − β1ᵗ)) / (√(V / (1 − β2ᵗ)) + ε)

``adam_convention="transformers"`` is instead the convention of ``transformers``' AdamW, which the
official GaLore, Fira and APOLLO packages copy::

    ψ(R) = M / (√V + ε)                 the update is then multiplied by  c_t = √(1 − β2ᵗ) / (1 − β1ᵗ)
    W ← (W − η·c_t·update)·(1 − η·λ)    (decay applied after the update)

The two agree except for ε (the first adds ε to √V̂, the second to √V, i.e. ε / √(1 − β2ᵗ) to √V̂) and
for where c_t enters: a rule that reads ψ's scale before the step is taken (Fira's φ, the limiter's
norm history) sees c_t with the first convention and not with the second. c_t moves by tens of
percent over the first steps, so a norm-growth limiter triggers differently; after a few hundred
steps c_t ≈ 1 and the two coincide.

Every function takes lists of tensors and uses the ``torch._foreach_*`` kernels when ``foreach`` is
true (one launch per op for the whole list instead of one per tensor), like ``torch/optim/adamw.py``.
Step counts are ints, or 0-d tensors on the device (``capturable=True``, as torch's capturable AdamW
keeps them): the bias corrections are then computed on the device, without a host read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw as torch_functional_adamw


ADAM_CONVENTIONS = ("torch", "transformers")


@dataclass(frozen=True)
class AdamOptions:
    """A group's Adam hyperparameters (constants of a compiled bucket step)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    convention: str

    @classmethod
    def of(cls, values) -> "AdamOptions":
        """From a group's option values (``betas``, ``eps``, ``weight_decay``, ``adam_convention``)."""
        beta1, beta2 = values.betas
        return cls(beta1, beta2, values.eps, values.weight_decay, values.adam_convention)


@dataclass
class AdamTensors:
    """What one AdamW step of plain parameters works on: lists of equal length."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list  # ints, or 0-d tensors on the device


def on_device(steps: list) -> bool:
    """Whether the step counts are 0-d tensors on the device (``capturable=True``)."""
    return bool(steps) and isinstance(steps[0], torch.Tensor)


def _bias_corrections(steps: list, beta1: float, beta2: float) -> tuple[list, list]:
    """(1 − β1ᵗ, √(1 − β2ᵗ)) per step count: floats, or 0-d tensors computed on the device."""
    if on_device(steps):
        t = torch.stack(steps)
        return list((1.0 - torch.pow(beta1, t)).unbind(0)), list((1.0 - torch.pow(beta2, t)).sqrt_().unbind(0))
    return [1.0 - beta1**t for t in steps], [math.sqrt(1.0 - beta2**t) for t in steps]


def step_factors(steps: list, adam: AdamOptions) -> list:
    """c_t = √(1 − β2ᵗ) / (1 − β1ᵗ) for the ``transformers`` convention, 1 for ``torch``."""
    if adam.convention == "torch":
        return [1.0] * len(steps)
    bc1, sqrt_bc2 = _bias_corrections(steps, adam.beta1, adam.beta2)
    return [c2 / c1 for c1, c2 in zip(bc1, sqrt_bc2)]


def as_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 0-d bool ``keep`` as 1.0/0.0 at the precision ``like``'s arithmetic runs in (≥ fp32): a
    product of the bool with a Python float would be fp32, short of an fp64 step's constants."""
    return keep.to(torch.promote_types(like.dtype, torch.float32))


def update_moments_(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor],
                    adam: AdamOptions, *, foreach: bool, keep: torch.Tensor | None = None) -> None:
    """M ← β1·M + (1 − β1)·R and V ← β2·V + (1 − β2)·R², in place (``keep``: a 0-d bool, R zero
    where it is false: the moments then stay as they are)."""
    if not grads:
        return
    beta1, beta2 = adam.beta1, adam.beta2
    if keep is not None:
        kept = as_mask(keep, exp_avgs[0])
        weight = (kept * (1.0 - beta1)).to(exp_avgs[0].dtype)  # (a list: no overload that reads it on the host)
        torch._foreach_lerp_(exp_avgs, grads, [weight] * len(exp_avgs))
        torch._foreach_mul_(exp_avg_sqs, torch.where(keep, kept.new_full((), beta2), 1.0))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        return
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        return
    for m, v, g in zip(exp_avgs, exp_avg_sqs, grads):
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def denominators(exp_avg_sqs: list[torch.Tensor], sqrt_bc2: list[float], eps: float, *,
                 foreach: bool) -> list[torch.Tensor]:
    """√(V / (1 − β2ᵗ)) + ε for each tensor (new tensors)."""
    if foreach:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, sqrt_bc2)
        torch._foreach_add_(denom, eps)
        return denom
    return [v.sqrt().div_(c).add_(eps) for v, c in zip(exp_avg_sqs, sqrt_bc2)]


def directions(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list, adam: AdamOptions, *,
               foreach: bool) -> list[torch.Tensor]:
    """ψ(R) for each tensor, from moments already updated at step ``t`` (1-based) (eq. 4–5).

    ``convention="transformers"`` leaves the bias correction out (see :func:`step_factors`).
    """
    if not exp_avgs:
        return []
    if adam.convention == "transformers":
        denom = denominators(exp_avg_sqs, [1.0] * len(steps), adam.eps, foreach=foreach)
        return torch._foreach_div(exp_avgs, denom) if foreach else [m.div(d) for m, d in zip(exp_avgs, denom)]
    bc1, sqrt_bc2 = _bias_corrections(steps, adam.beta1, adam.beta2)
    denom = denominators(exp_avg_sqs, sqrt_bc2, adam.eps, foreach=foreach)
    if foreach:
        psi = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(psi, bc1)
        return psi
    return [m.div(d).div_(c) for m, d, c in zip(exp_avgs, denom, bc1)]


def adamw_(batch: AdamTensors, adam: AdamOptions, lr, *, foreach: bool, keep: torch.Tensor | None = None) -> None:
    """One AdamW step on plain parameters, as ``torch.optim.AdamW`` does it (decoupled decay first),
    or as ``transformers``' AdamW with ``convention="transformers"`` (decay after the update).
    ``keep`` (a 0-d bool; the gradients zero where it is false; ``convention="torch"``, foreach, the
    steps 0-d tensors): when false nothing changes — the compiled step of ``capturable=True``."""
    if not batch.params:
        return
    if keep is not None:
        _masked_adamw_(batch, adam, lr, keep)
        return
    if adam.convention == "transformers":
        _transformers_adamw_(batch, adam, lr, foreach)
        return
    params, weight_decay = batch.params, adam.weight_decay
    if weight_decay != 0.0:
        if foreach:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            for p in params:
                p.mul_(1.0 - lr * weight_decay)
    update_moments_(batch.exp_avgs, batch.exp_avg_sqs, batch.grads, adam, foreach=foreach)
    bc1, sqrt_bc2 = _bias_corrections(batch.steps, adam.beta1, adam.beta2)
    denom = denominators(batch.exp_avg_sqs, sqrt_bc2, adam.eps, foreach=foreach)
    step_sizes = [-lr / c for c in bc1]
    if foreach:
        torch._foreach_addcdiv_(params, batch.exp_avgs, denom, step_sizes)
        return
    for p, m, d, s in zip(params, batch.exp_avgs, denom, step_sizes):
        p.addcdiv_(m, d, value=s)


def _transformers_adamw_(batch: AdamTensors, adam: AdamOptions, lr, foreach: bool) -> None:
    """:func:`adamw_` in ``transformers``' convention: ψ = M/(√V + ε) scaled by c_t, decay after."""
    params, weight_decay = batch.params, adam.weight_decay
    update_moments_(batch.exp_avgs, batch.exp_avg_sqs, batch.grads, adam, foreach=foreach)
    denom = denominators(batch.exp_avg_sqs, [1.0] * len(batch.steps), adam.eps, foreach=foreach)
    step_sizes = [-lr * c for c in step_factors(batch.steps, adam)]
    if foreach:
        torch._foreach_addcdiv_(params, batch.exp_avgs, denom, step_sizes)
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        return
    for p, m, d, s in zip(params, batch.exp_avgs, denom, step_sizes):
        p.addcdiv_(m, d, value=s)
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)


def _masked_adamw_(batch: AdamTensors, adam: AdamOptions, lr, keep: torch.Tensor) -> None:
    """:func:`adamw_` in torch's convention masked by ``keep`` (see there), without a host read; the
    steps are ints or 0-d device tensors."""
    kept = as_mask(keep, batch.params[0])
    if adam.weight_decay != 0.0:
        torch._foreach_mul_(batch.params, torch.where(keep, kept.new_full((), 1.0 - lr * adam.weight_decay), 1.0))
    update_moments_(batch.exp_avgs, batch.exp_avg_sqs, batch.grads, adam, foreach=True, keep=keep)
    bc1, sqrt_bc2 = _bias_corrections(batch.steps, adam.beta1, adam.beta2)
    denom = denominators(batch.exp_avg_sqs, sqrt_bc2, adam.eps, foreach=True)
    updates = torch._foreach_div(batch.exp_avgs, denom)
    torch._foreach_mul_(updates, [-lr * kept / c for c in bc1])
    torch._foreach_add_(batch.params, updates)


FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def fused_applies(param: torch.Tensor, convention: str) -> bool:
    """torch's fused AdamW kernel can step ``param`` in this convention (torch's own, a floating-point
    parameter on a device the kernel supports)."""
    return convention == "torch" and param.is_floating_point() and param.device.type in FUSED_DEVICES


def fused_adamw_(batch: AdamTensors, adam: AdamOptions, lr, found_inf: torch.Tensor | None = None) -> None:
    """torch's functional AdamW with ``fused=True`` (one kernel per device and dtype: on the CPU 6×
    faster than the foreach path). ``batch.steps``: 0-d fp32 tensors on the parameters' device, which
    torch advances by one (and takes back where ``found_inf`` is 1: the step is then skipped)."""
    torch_functional_adamw(batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, [], batch.steps, fused=True,
                           found_inf=found_inf, amsgrad=False, beta1=adam.beta1, beta2=adam.beta2, lr=lr,
                           weight_decay=adam.weight_decay, eps=adam.eps, maximize=False)


def host_values(values: list[float], device: torch.device) -> torch.Tensor:
    """A 1-D fp32 tensor of host numbers on ``device`` without a host synchronisation: equal values are
    one fill; others are copied from pinned memory on a GPU (a pageable copy would wait for the stream)."""
    if all(v == values[0] for v in values):
        return torch.full((len(values),), values[0], dtype=torch.float32, device=device)
    column = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        column = column.pin_memory()
    return column.to(device, non_blocking=True)


def per_matrix(values: list, like: torch.Tensor) -> float | torch.Tensor:
    """A Python float when every matrix of a stack shares the value, else a B×1×1 tensor on the
    stack's device (copied from pinned memory without a host synchronisation; stacked when the
    values are 0-d device tensors already)."""
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values).view(-1, *([1] * (like.dim() - 1)))
    if all(v == values[0] for v in values):
        return values[0]
    return host_values(values, like.device).view(-1, *([1] * (like.dim() - 1)))


def masked_adamw_(batch: AdamTensors, adam: AdamOptions, lr, keep: torch.Tensor) -> None:
    """One parameter's :func:`adamw_` that changes nothing when the 0-d bool ``keep`` is false
    (``grad`` already zero there): the layer-wise mode's on-device skip, no host synchronisation."""
    if adam.convention == "torch":
        _masked_adamw_(batch, adam, lr, keep)
        return
    (param,), (grad,), (exp_avg,), (exp_avg_sq,), (step,) = (batch.params, batch.grads, batch.exp_avgs,
                                                             batch.exp_avg_sqs, batch.steps)
    update_moments_([exp_avg], [exp_avg_sq], [grad], adam, foreach=True, keep=keep)
    denom = exp_avg_sq.sqrt().add_(adam.eps)
    size = lr * step_factors([step], adam)[0]
    param.addcdiv_(exp_avg * keep, denom, value=-size)
    if adam.weight_decay != 0.0:
        param.mul_(torch.where(keep, as_mask(keep, param).new_full((), 1.0 - lr * adam.weight_decay), 1.0))
