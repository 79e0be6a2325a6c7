"""Flora (Hao, Cao & Mou, ICML 2024, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors"),
the baseline of Fira's rebuttal Tables r6/r7.

Flora is Adafactor (factored second moment, update-RMS clipping, step size relative to the
parameter's RMS) whose first moment M is kept *compressed* by a random down-projection
(the paper's Algorithm 2, "Flora with momentum"; the compressor of Algorithm 1). For an m×n
matrix with m < n, A ∈ R^{r×m} with entries N(0, 1/r) and M = A·U (r×n); otherwise
B ∈ R^{n×r} and M = U·B (m×r). Each step, with U the Adafactor-normalised gradient:

    update = (1 − β1)·U + β1·decompress(M)          (Aᵀ·M or M·Bᵀ)
    every κ steps: new projection A' (new seed);  M ← A'·Aᵀ·M   (momentum transferred)
    M ← β1·M + (1 − β1)·compress(U)                 (with the current projection)
    W ← W·(1 − lr_t·λ) − lr_t · update / max(1, RMS(update)/d)

Only the seed of each projection is stored. A matrix is compressed when its group carries a
``rank`` r ≤ min(m, n) and max(m, n)/min(m, n) ≤ 4 (embeddings keep a full first moment), as in the
authors' implementation; κ is the group's ``kappa``, else its ``update_proj_gap``, else 1000.
Projections are drawn on the CPU from ``torch.Generator().manual_seed(seed)``; the k-th parameter
starts at seed ``seed + k`` (k from 1) and each resampling moves to ``next_seed(seed)``.

On FSDP2-sharded parameters (DTensors) the state and the projections are DTensors too (row factors
and row-side moments sharded like the weight, the rest replicated) and DTensor's operators do the
reductions across processes: the same updates as unsharded, without Flora-specific collectives.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ..base import closure as closures
from ..base.options import Option, flag, integer, resolve
from ..base.shards import DTensor, Replicate, Shard, chunk_span, is_distributed_tensor, local

DEFAULT_KAPPA = 1000
MAX_ASPECT = 4
_SEED_MODULUS = 2 ** 63


def _count_or_none(name, value) -> None:
    if value is not None and (int(value) != value or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value}")


def _check(test, what: str):
    def check(name, value):
        if not test(value):
            raise ValueError(f"{name} must be {what}, got {value}")
    return check


FLORA_OPTIONS = {
    "rank": Option(None, _count_or_none, "r of the compressed first moment (None: kept whole)"),
    "kappa": Option(None, _count_or_none, "κ, steps between resamplings (default: update_proj_gap, else 1000)"),
    "decay_rate": Option(-0.8, _check(lambda v: v < 0, "< 0"), "Adafactor's β2,t = 1 − t^decay_rate"),
    "adafactor_eps": Option((1e-30, 1e-3), _check(lambda v: len(v) == 2 and min(v) >= 0, "two numbers >= 0"),
                            "(ε1, ε2): regularise the squared gradient and the parameter scale"),
    "clip_threshold": Option(1.0, _check(lambda v: v > 0, "> 0"), "d of the update's RMS clipping"),
    "scale_parameter": Option(False, flag, "step size relative to the parameter's RMS (Adafactor's)"),
    "factorize_second_moment": Option(True, flag, "Adafactor's factored second moment for matrices"),
    "seed": Option(0, integer(), "the k-th parameter's first projection seed is seed + k"),
}


def next_seed(seed: int) -> int:
    """The seed of the next projection (a 64-bit linear congruential step, Knuth's MMIX constants)."""
    return (seed * 6364136223846793005 + 1442695040888963407) % _SEED_MODULUS


def random_projection(seed: int, shape: tuple[int, int], rank: int, device, dtype) -> torch.Tensor:
    """The down-projection of an m×n matrix: A (r×m) when m < n, else B (n×r); entries N(0, 1/r)."""
    m, n = shape
    size = (rank, m) if m < n else (n, rank)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, generator=generator) / math.sqrt(rank)).to(device=device, dtype=dtype)


def compress(projection: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    m, n = tensor.shape
    return projection @ tensor if m < n else tensor @ projection


def decompress(projection: torch.Tensor, compressed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    m, n = shape
    return projection.T @ compressed if m < n else compressed @ projection.T


def _device(tensor: torch.Tensor) -> torch.device:
    return local(tensor).device


def _like(param: torch.Tensor, tensor: torch.Tensor, shard_dim: int | None) -> torch.Tensor:
    """``tensor`` (whole, the same on every process) laid out for ``param``: for an FSDP2 DTensor a
    DTensor sharded along ``shard_dim`` like the parameter's rows (None: replicated), so that Flora's
    arithmetic runs on DTensors and their reductions span the processes; else ``tensor`` itself."""
    if not is_distributed_tensor(param):
        return tensor
    mesh = param.device_mesh
    if shard_dim is None:  # every process drew the same numbers: no communication
        return DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)
    start, size = chunk_span(tensor.shape[shard_dim], mesh.size(), mesh.get_local_rank())
    return DTensor.from_local(tensor.narrow(shard_dim, start, size).contiguous(), mesh, [Shard(shard_dim)],
                              run_check=False, shape=tensor.shape, stride=tensor.stride())


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm() / math.sqrt(tensor.numel())


class Flora(Optimizer):
    """Flora: Adafactor with a randomly compressed, periodically resampled first moment (see module doc).

    The signature is the presets' (``make_optimizer("flora", groups, lr=, betas=, eps=, weight_decay=)``):
    β1 = ``betas[0]`` (0 turns the first moment off: plain Adafactor); Adam's β2 and ε have no
    Adafactor counterpart and are not used (β2,t = 1 − t^``decay_rate``; the ε pair is
    ``adafactor_eps`` = (ε1, ε2), regularising the squared gradient and the parameter scale).
    ``lr`` is the step size of the RMS-clipped update, as an Adam lr (so ``--lr`` means the same for
    every preset); ``scale_parameter=True`` (Adafactor's and the authors' package default) makes it
    relative: multiplied by max(ε2, RMS(W)).
    """

    @staticmethod
    def option_table() -> dict[str, tuple]:
        """{option: (default, meaning)} of Flora's options beside the presets' lr, betas, eps, weight_decay."""
        return {name: (option.default, option.doc) for name, option in sorted(FLORA_OPTIONS.items())}

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 **options):
        beta1 = betas[0]
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"betas[0] (Flora's beta1) must lie in [0, 1), got {beta1}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        options = resolve(type(self).__name__, FLORA_OPTIONS, options)
        seed = options.pop("seed")
        defaults = {"lr": lr, "beta1": beta1, "weight_decay": weight_decay, **options,
                    "adafactor_eps": tuple(options["adafactor_eps"])}
        super().__init__(params, defaults)
        index = seed
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                self.state[p]["seed"] = index

    @staticmethod
    def _kappa(group: dict) -> int:
        kappa = group.get("kappa") or group.get("update_proj_gap") or DEFAULT_KAPPA
        if int(kappa) != kappa or kappa < 1:
            raise ValueError(f"kappa must be an integer >= 1, got {kappa}")
        return int(kappa)

    @staticmethod
    def compresses(group: dict, shape: tuple[int, ...]) -> bool:
        """Whether the first moment of a parameter of ``shape`` in ``group`` is kept compressed."""
        rank, beta1 = group.get("rank"), group.get("beta1")
        return (beta1 is not None and beta1 > 0 and rank is not None and len(shape) == 2
                and group["factorize_second_moment"] and min(shape) >= rank
                and max(shape) / min(shape) <= MAX_ASPECT)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closures.evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss

    def _update(self, group: dict, p: torch.Tensor) -> None:
        grad = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad  # (fp64 stays fp64)
        if grad.is_sparse:
            raise RuntimeError("Flora does not support sparse gradients")
        weight = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state = self.state[p]
        if "step" not in state:
            self._initial_state(group, p, grad)
        state["step"] += 1
        eps2 = group["adafactor_eps"][1]
        lr = group["lr"] * (max(eps2, _rms(weight).item()) if group["scale_parameter"] else 1.0)
        update = self._normalised(group, state, grad)
        if group["beta1"]:
            update = self._with_momentum(group, p, state, update)
        update = update / (_rms(update) / group["clip_threshold"]).clamp(min=1.0)
        if group["weight_decay"]:
            weight.mul_(1.0 - group["weight_decay"] * lr)
        weight.add_(update, alpha=-lr)
        if weight is not p:
            p.copy_(weight)

    def _initial_state(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Adafactor's second moment (factored for a matrix) and the first moment (compressed or whole)."""
        state, shape = self.state[p], tuple(grad.shape)
        state["step"] = 0
        if grad.dim() == 2 and group["factorize_second_moment"]:
            state["exp_avg_sq_row"] = _like(p, torch.zeros(shape[0], dtype=grad.dtype, device=_device(grad)), 0)
            state["exp_avg_sq_col"] = _like(p, torch.zeros(shape[1], dtype=grad.dtype, device=_device(grad)), None)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        if not group["beta1"]:
            return
        if self.compresses(group, shape):
            rank = group["rank"]
            low = (rank, shape[1]) if shape[0] < shape[1] else (shape[0], rank)
            moment = torch.zeros(low, dtype=grad.dtype, device=_device(grad))
            state["exp_avg"] = _like(p, moment, None if shape[0] < shape[1] else 0)
        else:
            state["exp_avg"] = torch.zeros_like(grad)

    @staticmethod
    def _normalised(group: dict, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """The gradient normalised by Adafactor's second moment at step t."""
        t = state["step"]
        beta2t = 1.0 - t ** group["decay_rate"]
        squared = grad.square() + group["adafactor_eps"][0]
        if grad.dim() == 2 and group["factorize_second_moment"]:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            row_factor = (row / row.mean()).rsqrt().unsqueeze(-1)
            return grad * row_factor * col.rsqrt().unsqueeze(0)
        v = state["exp_avg_sq"]
        v.mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
        return grad * v.rsqrt()

    def _with_momentum(self, group: dict, p: torch.Tensor, state: dict, update: torch.Tensor) -> torch.Tensor:
        """(1 − β1)·U + β1·M, M compressed (resampled every κ steps, Algorithm 2) or whole."""
        beta1, m = group["beta1"], state["exp_avg"]
        shape = tuple(update.shape)
        if not self.compresses(group, shape):
            update = (1.0 - beta1) * update + beta1 * m
            m.copy_(update)
            return update
        rank, seed, device = group["rank"], state["seed"], _device(update)
        projection = _like(p, random_projection(seed, shape, rank, device, update.dtype), None)
        normalised = update
        update = (1.0 - beta1) * normalised + beta1 * decompress(projection, m, shape)
        if state["step"] % self._kappa(group) == 0:  # resample; transfer the momentum (Algorithm 2)
            seed = state["seed"] = next_seed(seed)
            new_projection = _like(p, random_projection(seed, shape, rank, device, update.dtype), None)
            m.copy_(compress(new_projection, decompress(projection, m, shape)))
            projection = new_projection
        m.mul_(beta1).add_(compress(projection, normalised), alpha=1.0 - beta1)
        return update
