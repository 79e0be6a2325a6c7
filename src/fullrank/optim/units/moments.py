"""Where Adam's moments M and V live: the moment-storage seam (``states=``).

The engine never reads a moment tensor itself. It asks the group's store to ``load`` a bucket's
moments as working tensors in at least fp32 (or the stored tensors themselves, which are then
updated in place), runs Adam on them (eq. 4–5), and hands them back with ``save``:

* ``32bit``  the moments are tensors of the parameter's dtype, updated in place (load returns them,
             save does nothing): the engine's arithmetic is that of ``torch.optim.AdamW``.
* ``8bit``   blockwise 8-bit moments (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
             Quantization"), quantized by ``bitsandbytes.functional.quantize_blockwise``: each block
             of 256 consecutive values keeps its absolute maximum in fp32 and each value one byte,
             an index into bitsandbytes' dynamic map (signed for M, unsigned for V), the layout of
             ``bitsandbytes.optim.AdamW8bit``. A bucket's moments are dequantized to fp32, updated,
             and quantized back, so the fp32 temporaries are those of one bucket (plain parameters
             are stepped in chunks of ``CHUNK_ELEMENTS``). Tensors of fewer than
             ``MIN_8BIT_ELEMENTS`` values stay at the parameter's precision, as in bitsandbytes.
             On FSDP2 shards each rank quantizes its share in blocks of its own flat layout; the
             size test is of the whole tensor (``split``: the dim and whole size the share is cut
             from), so every rank, and the unsharded run, decide alike.

A store's state keys: ``exp_avg``/``exp_avg_sq`` (uint8 for 8-bit, the low-rank shape kept) and, for
8-bit, ``exp_avg_absmax``/``exp_avg_sq_absmax`` (fp32, one per block). The low-rank shape of a
projected matrix (and so its rank) is read through :func:`low_shape`, never from a tensor elsewhere.
"""
from __future__ import annotations

import math

import torch

from ..base.units import Registry, Unit

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"  # Adam's moments: the parameter's, or the low-rank, shape
EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX = "exp_avg_absmax", "exp_avg_sq_absmax"  # 8-bit: fp32 maximum per block

BLOCK = 256  # bitsandbytes' block size of its blockwise 8-bit optimizers
MIN_8BIT_ELEMENTS = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep full-precision moments
CHUNK_ELEMENTS = BLOCK * 2**14  # 4M values: the fp32 working set of a plain parameter's 8-bit step
ABSMAX_KEYS = {EXP_AVG: EXP_AVG_ABSMAX, EXP_AVG_SQ: EXP_AVG_SQ_ABSMAX}


def chunk_spans(numel: int) -> list[slice]:
    """Flat spans of at most ``CHUNK_ELEMENTS`` (whole 8-bit blocks) covering ``numel`` values."""
    return [slice(k, min(k + CHUNK_ELEMENTS, numel)) for k in range(0, numel, CHUNK_ELEMENTS)]


def whole_numel(shape, split: tuple[int, int] | None) -> int:
    """Values of the whole tensor of which ``shape`` is this rank's share, ``split`` = (dim, whole
    size) on FSDP2 shards (``base/shards.state_split``); None: ``shape`` is whole."""
    if split is None:
        return math.prod(shape)
    dim, size = split
    return math.prod(s for k, s in enumerate(shape) if k != dim) * size


def low_shape(state: dict) -> torch.Size | None:
    """The shape of a projected matrix's moments (r×n, m×r or r×r), None before its first refresh."""
    moment = state.get(EXP_AVG)
    return None if moment is None else moment.shape


def new_moments(state: dict, shape: torch.Size, like: torch.Tensor) -> None:
    """Zero moments of ``shape`` in ``like``'s dtype and device, at full precision."""
    state[EXP_AVG] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    state[EXP_AVG_SQ] = torch.zeros(shape, dtype=like.dtype, device=like.device)


class MomentStore(Unit):
    """``32bit``: the moments at the parameter's precision, updated in place."""

    name = "32bit"

    def zeros(self, state: dict, shape: torch.Size, like: torch.Tensor, split: tuple[int, int] | None = None) -> None:
        """Allocate zero moments of ``shape`` for a parameter like ``like`` (``split``: see :func:`whole_numel`)."""
        new_moments(state, shape, like)

    def load(self, states: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(M, V) of each state as working tensors (here: the stored tensors themselves)."""
        return [s[EXP_AVG] for s in states], [s[EXP_AVG_SQ] for s in states]

    def save(self, states: list[dict], exp_avgs, exp_avg_sqs, keep: torch.Tensor | None = None) -> None:
        """Store the working tensors back (``keep``, a 0-d bool: when false the stored moments stay
        as they were). In place here: nothing to do."""

    def replace(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                split: tuple[int, int] | None = None) -> None:
        """Store new working moments of any shape (a subspace switch re-projected them)."""
        state[EXP_AVG], state[EXP_AVG_SQ] = exp_avg, exp_avg_sq

    def adopt(self, state: dict, param: torch.Tensor, split: tuple[int, int] | None = None) -> None:
        """Bring loaded moments saved by another store to this one (a resume that changes ``states``)."""
        if EXP_AVG in state and state[EXP_AVG].dtype == torch.uint8:
            exp_avgs, exp_avg_sqs = STORE_REGISTRY.get("8bit").load([state])
            for key in ABSMAX_KEYS.values():
                del state[key]
            dtype = param.dtype if param.is_floating_point() else torch.float32
            self.replace(state, exp_avgs[0].to(dtype), exp_avg_sqs[0].to(dtype))


class Blockwise8bit(MomentStore):
    """``8bit``: blockwise-quantized moments (see the module docstring)."""

    name = "8bit"

    def __init__(self):
        self._maps: dict[tuple, torch.Tensor] = {}

    def kept_dtype_keys(self) -> tuple[str, ...]:
        """The block maxima stay fp32 on load (the uint8 moments keep theirs: integers are not cast)."""
        return tuple(ABSMAX_KEYS.values())

    def code(self, signed: bool, like: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' dynamic map on ``like``'s device (a fake tensor under ``FakeTensorMode``)."""
        import bitsandbytes.functional as F
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        fake_mode = getattr(like, "fake_mode", None)
        key = (signed, torch.device("cpu") if fake_mode is not None else like.device)
        if key not in self._maps:
            with unset_fake_temporarily():  # a real map, also while tracing
                self._maps[key] = F.create_dynamic_map(signed=signed).to(key[1])
        code = self._maps[key]
        return code if fake_mode is None else fake_mode.from_tensor(code).to(like.device)

    @staticmethod
    def quantized(state: dict) -> bool:
        return state[EXP_AVG].dtype == torch.uint8

    def zeros(self, state, shape, like, split=None):
        for key in ABSMAX_KEYS.values():
            state.pop(key, None)
        if whole_numel(shape, split) < MIN_8BIT_ELEMENTS:
            new_moments(state, shape, like)
            return
        blocks = -(-torch.Size(shape).numel() // BLOCK)
        for key, absmax_key in ABSMAX_KEYS.items():
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=like.device)
            state[absmax_key] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def _dequantize(self, state: dict, key: str, signed: bool, out: torch.Tensor | None = None,
                    span: slice | None = None) -> torch.Tensor:
        import bitsandbytes.functional as F

        quantized, absmax = state[key], state[ABSMAX_KEYS[key]]
        if span is not None:
            quantized = quantized.view(-1)[span]
            absmax = absmax[span.start // BLOCK: -(-span.stop // BLOCK)]
        return F.dequantize_blockwise(quantized, absmax=absmax, code=self.code(signed, quantized), out=out,
                                      blocksize=BLOCK)

    def _quantize(self, state: dict, key: str, signed: bool, value: torch.Tensor, keep=None,
                  span: slice | None = None) -> None:
        import bitsandbytes.functional as F

        quantized, absmax = state[key], state[ABSMAX_KEYS[key]]
        if span is not None:
            quantized = quantized.view(-1)[span]
            absmax = absmax[span.start // BLOCK: -(-span.stop // BLOCK)]
        code = self.code(signed, quantized)
        if keep is None:
            F.quantize_blockwise(value.reshape(quantized.shape), code=code, absmax=absmax, out=quantized,
                                 blocksize=BLOCK)
            return
        new, new_state = F.quantize_blockwise(value.reshape(quantized.shape), code=code, blocksize=BLOCK)
        quantized.copy_(torch.where(keep, new, quantized))
        absmax.copy_(torch.where(keep, new_state.absmax, absmax))

    def dequantize(self, quantized: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
        """fp32 values of one quantized tensor and its block maxima (M: ``signed``; a checkpoint's share
        of another number of ranks, ``distributed/checkpoint.py``)."""
        return self._dequantize({EXP_AVG: quantized, EXP_AVG_ABSMAX: absmax}, EXP_AVG, signed)

    def load(self, states):
        exp_avgs, exp_avg_sqs = [], []
        for s in states:
            if self.quantized(s):
                exp_avgs.append(self._dequantize(s, EXP_AVG, True))
                exp_avg_sqs.append(self._dequantize(s, EXP_AVG_SQ, False))
            else:
                exp_avgs.append(s[EXP_AVG])
                exp_avg_sqs.append(s[EXP_AVG_SQ])
        return exp_avgs, exp_avg_sqs

    def save(self, states, exp_avgs, exp_avg_sqs, keep=None):
        for s, m, v in zip(states, exp_avgs, exp_avg_sqs):
            if self.quantized(s):
                self._quantize(s, EXP_AVG, True, m, keep)
                self._quantize(s, EXP_AVG_SQ, False, v, keep)

    def replace(self, state, exp_avg, exp_avg_sq, split=None):
        self.zeros(state, exp_avg.shape, exp_avg, split)  # (below MIN_8BIT_ELEMENTS: full precision)
        if self.quantized(state):
            self._quantize(state, EXP_AVG, True, exp_avg)
            self._quantize(state, EXP_AVG_SQ, False, exp_avg_sq)
        else:
            super().replace(state, exp_avg, exp_avg_sq)

    def adopt(self, state, param, split=None):
        moment = state.get(EXP_AVG)
        if moment is not None and moment.dtype != torch.uint8 and whole_numel(moment.shape, split) >= MIN_8BIT_ELEMENTS:
            self.replace(state, moment.float(), state[EXP_AVG_SQ].float(), split)

    def load_span(self, state: dict, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (M, V) of one chunk of a plain parameter's quantized moments."""
        return (self._dequantize(state, EXP_AVG, True, span=span),
                self._dequantize(state, EXP_AVG_SQ, False, span=span))

    def save_span(self, state: dict, span: slice, exp_avg, exp_avg_sq, keep=None) -> None:
        self._quantize(state, EXP_AVG, True, exp_avg, keep, span)
        self._quantize(state, EXP_AVG_SQ, False, exp_avg_sq, keep, span)


STORE_REGISTRY = Registry("moment store", "states", MomentStore)


def register_store(store: MomentStore) -> None:
    """Make ``store`` available as ``states=store.name``."""
    STORE_REGISTRY.register(store)


for _store in (MomentStore(), Blockwise8bit()):
    register_store(_store)


def get_store(name: str) -> MomentStore:
    return STORE_REGISTRY.get(name)


def require_bitsandbytes(name: str) -> None:
    """A clear error when ``states='8bit'`` is asked for without bitsandbytes installed."""
    if name != "8bit":
        return
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError as err:
        raise ValueError("states='8bit' needs the bitsandbytes package (pip install 'fullrank[lowbit]' or 'bitsandbytes>=0.50'): "
                         f"{err}") from None
