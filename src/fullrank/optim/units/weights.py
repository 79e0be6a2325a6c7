"""How the step writes the weights, W ← W·(1 − ηλ) − η·update: the weight writers, a registry like the
moment stores, chosen by the weights' dtype and ``stochastic_rounding``.

* ``nearest``     the weights are updated in their own dtype (fp32; bf16 rounded to nearest).
* ``stochastic``  bf16 weights written by stochastic rounding. Pure-bf16 training (GaLore's 7B
                  recipe: no fp32 master copy) loses updates smaller than half a bf16 ulp of the
                  weight when the new weight is rounded to nearest: with lr 1e-2 and late-training
                  update sizes most of them vanish. ``stochastic_rounding=True`` rounds W_t − η·u_t,
                  computed in fp32, up or down at random with the probabilities that make the
                  rounding unbiased, E[bf16(x)] = x (Gupta et al. 2015; Zamirai et al. 2020,
                  "Revisiting BFloat16 Training"): the update survives in expectation. A bf16 value is
                  the top 16 bits of an fp32 one, so the rounding adds a uniform random integer in
                  [0, 2¹⁶) to the fp32 bits and truncates them, on the device. The random bits come
                  from a generator seeded by (``seed``, the parameter's position, its step, and on
                  FSDP2 shards the rank's row offset, so that the ranks do not reuse one stream): a
                  resumed run draws the same numbers. The fp32 working copy is one bucket's weights
                  (or one chunk of a plain parameter's).

A writer takes an update in one of two forms: :class:`FactoredUpdate` (one matrix, the update left as
its terms: two passes over W, no m×n temporary) or a stack of whole updates (:meth:`write_stack`).
A new weight format (e.g. int8 with a scale per block) is one writer: ``accepts`` its dtype, and
``working_copy``/``write_back`` convert to and from a dtype the arithmetic runs in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.seeds import projection_seed
from ..base.units import Registry, Unit
from .adam import as_mask, per_matrix
from .projection import add_projected_back_

_ROUNDING_STREAM = 0x5EED  # keeps the rounding's random stream apart from the projections' (same seed)


@dataclass
class FactoredUpdate:
    """One matrix's W ← W·decay − η·(a·back(term) + coef∘base): ``term`` the low-rank term (or None),
    ``coef`` the residual's factors (or None), ``projection`` its (P, Q)."""

    base: torch.Tensor
    coef: torch.Tensor | None
    term: torch.Tensor | None
    a: float
    projection: tuple
    step_size: float
    decay: float


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """``target`` (bf16) ← ``value`` (fp32) rounded stochastically: unbiased, E[target] = value."""
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = noise.add_(bits).bitwise_and_(-65536)  # 0xFFFF0000: the bf16 bits, exact in fp32
    target.copy_(rounded.view(torch.float32))


class WeightWriter(Unit):
    """``nearest``: the update is applied in the weights' own dtype."""

    name = "nearest"
    in_place = True  # writes the weights themselves (no working copy)

    def accepts(self, dtype: torch.dtype, stochastic_rounding: bool) -> bool:
        return True

    def generators(self, seed: int, ordinals: list[int], steps: list, device: torch.device,
                   row_offsets: list[int] | None = None) -> list | None:
        """The writer's random generators for these matrices at these steps, ``row_offsets`` where each
        rank's rows start (FSDP2 shards; None: whole matrices). None: the writer draws nothing."""
        return None

    def working_copy(self, weight: torch.Tensor) -> torch.Tensor:
        """What the arithmetic updates in place: the weight itself."""
        return weight

    def write_back(self, weight: torch.Tensor, work: torch.Tensor, generator) -> None:
        """Store an updated working copy into the weight (nothing to do: it was the weight)."""

    def write_matrix(self, param: torch.Tensor, update: FactoredUpdate) -> None:
        """W ← W·decay − η·(a·back(term) + coef∘G) for one matrix, in two passes over W: one ``addmm_``
        (with the decay as its β) and one ``addcmul_`` — no m×n temporary."""
        left, right = (None if p is None else p[0] for p in update.projection)
        if update.term is not None:
            add_projected_back_(param, update.term, left, right, alpha=-update.step_size * update.a,
                                beta=update.decay)
        elif update.decay != 1.0:
            param.mul_(update.decay)
        if update.coef is not None:
            param.addcmul_(update.base, update.coef, value=-update.step_size)

    def write_stack(self, params: list[torch.Tensor], update: torch.Tensor, step_sizes: list, decay,
                    keep: torch.Tensor | None = None, generators: list | None = None) -> None:
        """W_b ← W_b·decay − η_b·update_b for every matrix of the stack. ``step_sizes`` are floats or 0-d
        device tensors, ``decay`` a float or a 0-d tensor (a tensor ``lr``). ``keep`` (a 0-d bool on the
        device: the layer-wise mode and ``capturable=True``; the update finite): when false every W
        stays as it was. ``update`` is overwritten."""
        step_size = per_matrix(step_sizes, update)
        if isinstance(step_size, torch.Tensor):  # B×1×1: the product is taken in fp32 and above
            update.mul_(step_size if keep is None else step_size * keep)
            step_size = 1.0
        elif keep is not None:
            update.mul_(keep)
        if isinstance(decay, torch.Tensor) or decay != 1.0:
            if keep is not None and not isinstance(decay, torch.Tensor):  # at the weights' arithmetic's precision
                decay = as_mask(keep, params[0]).new_full((), decay)
            torch._foreach_mul_(params, decay if keep is None else torch.where(keep, decay, 1.0))
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-step_size)


class StochasticRounding(WeightWriter):
    """``stochastic``: bf16 weights, updated in fp32 working copies and rounded back stochastically."""

    name = "stochastic"
    in_place = False

    def accepts(self, dtype, stochastic_rounding):
        return stochastic_rounding and dtype == torch.bfloat16

    def generators(self, seed, ordinals, steps, device, row_offsets=None):
        """One generator per matrix, seeded by (``seed``, its ordinal, its step) on a stream of its own,
        moved by the shard's row offset (0 for a whole matrix: the unsharded stream)."""
        offsets = row_offsets or [0] * len(ordinals)
        return [torch.Generator(device=device).manual_seed(
                    projection_seed(seed + _ROUNDING_STREAM + offset, ordinal, step))
                for ordinal, step, offset in zip(ordinals, steps, offsets)]

    def working_copy(self, weight):
        return weight.float()

    def write_back(self, weight, work, generator):
        stochastic_round_(weight, work, generator)

    def write_stack(self, params, update, step_sizes, decay, keep=None, generators=None):
        work = [self.working_copy(p) for p in params]
        super().write_stack(work, update, step_sizes, decay, keep)
        for param, value, generator in zip(params, work, generators):
            self.write_back(param, value, generator)


WEIGHT_WRITERS = Registry("weight writer", "stochastic_rounding", WeightWriter)
for _writer in (WeightWriter(), StochasticRounding()):
    WEIGHT_WRITERS.register(_writer)


def select_writer(dtype: torch.dtype, stochastic_rounding: bool) -> WeightWriter:
    """The writer of weights of ``dtype``: the last registered one that accepts them."""
    return next(w for w in reversed(WEIGHT_WRITERS.units()) if w.accepts(dtype, stochastic_rounding))
