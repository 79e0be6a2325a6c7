"""FSDP2: the engine on row-sharded parameters (``fully_shard``: DTensor, ``Shard(0)`` on a 1-D mesh).

Each rank holds rows ``[o, o + m_k)`` of every m×n weight and of its gradient (torch.chunk's split:
⌈m/w⌉ rows per rank, the last ranks fewer). The projection is always of the *whole* matrix — the
updates equal the unsharded optimizer's — and every rank keeps only its share of the state:

* **right projection** (R = G·Qᵀ, m×r; ``std`` for m ≥ n): R's rows are G's rows, so the projection,
  Adam (moments m_k×r) and the column factors of eq. 11 (one per row of G) are local. Q (r×n) is
  replicated: both the projection and the back-projection read all of it.
* **left projection** (R = Pᵀ·G, r×n; ``std`` for m < n): each rank holds its rows of P (m_k×r) and
  computes the partial product P_kᵀ·G_k; a **reduce-scatter** sums them and leaves rank k the columns
  ``[c, c + n_k)`` of R (⌈n/w⌉ per rank), on which it runs Adam (moments r×n_k) and the rule (the
  column norms of G for its columns: a reduce-scatter of an n-vector); an **all-gather** of the
  low-rank term (and of the column factors) gives every rank what it needs for its rows of the update.
* **norms of whole matrices** (‖ψ‖, ‖R‖ of eq. 10, ‖S‖ of eq. 12, ‖G‖): partial sums of squares,
  summed by an all-reduce of one B-vector per bucket; the limiter then sees the same norms on
  every rank, so its kept norm is replicated.
* **refresh** (exact, randomized or warm SVD): the due matrices of a shape are dealt to owner ranks
  in rounds of w (one matrix per owner and round, so an owner holds one whole gradient at a time);
  each matrix's gradient is **gathered to its owner** only, the owner runs exactly the
  unsharded refresh on the whole gradient (so P is bit-for-bit the one a single process would find,
  and the SVD work is split w ways), then **broadcasts** the new P (m×r) or Q (r×n) and, for an
  adaptive rank, the rank. Rank k keeps its rows of P. AdaRankGrad's moment rotation is local for a
  right projection and needs Pᵀ_new·P_old (r×r, an all-reduce) for a left one. APOLLO's and GoLore's
  random projections are drawn from the seed on every rank: no communication.

Communication per matrix, in elements of the gradient's dtype, w ranks (ring collectives: an
all-reduce of N elements moves 2·N·(w−1)/w per rank, a reduce-scatter or all-gather N·(w−1)/w):

==========================  ==========================================  =================================
                            every step                                  every refresh (T steps)
==========================  ==========================================  =================================
right projection (m ≥ n)    all-reduce of 1–2 scalars (‖S‖², ‖ψ‖, ‖R‖)  gather m·n to the owner,
                                                                        broadcast r·n
left projection (m < n)     reduce-scatter r·n + all-gather (r+1)·n     gather m·n to the owner,
                            (+ reduce-scatter n for column norms)       broadcast m·r (+ all-reduce r²)
the step (all matrices)     one all-reduce of the gradient norms (finiteness, ‖G‖): one scalar each
==========================  ==========================================  =================================

For comparison, FSDP itself moves 3·m·n per matrix per step (all-gather forward and backward,
reduce-scatter of the gradient). At LLaMA-130M shapes (r = 256, 2 processes, fp32) the optimizer
moves 48 MiB per step and process, all of it for the 12 left-projected matrices, against FSDP's own
767 MiB (6%); a refresh step adds 225 MiB, once every T steps (``bench/fsdp.py``). An all-reduce of
each matrix's Gram matrix (n×n or m×m) per refresh would move more for every LLaMA shape, and it
squares the condition number. During a refresh an owner holds its share of the due gradients whole:
(due matrices / w)·m·n elements. ``CommLog`` counts what was moved
(``bench/fsdp.py`` and the tests check this table against it).

**Layer-wise** (``distributed/layerwise.py``): each parameter is stepped in backward from FSDP2's
post-accumulate-grad hook, as a bucket of one matrix: the same reduce-scatters, all-gathers, gathers
and broadcasts per matrix as above (a refresh gathers to rank ``ordinal % w``), while the scalars
that the ordinary step sums in one all-reduce per bucket go in one all-reduce per parameter (‖G‖²:
finiteness) or per matrix (the rule's norms), and ``LayerwiseOptimizer.step`` adds one all-reduce of
one flag per parameter.

**8-bit moments** (``states="8bit"``): each rank quantizes its share of a moment (the tensor above)
in blocks of its own flat layout, so the blocks differ from the unsharded run's (not bit-equal to
one process); a moment is quantized when the *whole* tensor has ≥ 4096 values, the same decision on
every rank and as unsharded. **Stochastic rounding** (bf16 weights): each rank's rounding noise is
seeded by its row offset as well, so the ranks do not reuse one stream.

Not supported (clear errors): two-sided projections (``proj_type="full"``), meshes of more than one
dimension or placements other than ``Shard(0)``, ``capturable=True``, pre-projection transforms, and
rules that do not declare themselves ``shard_aware`` (a rule written for whole matrices would see
partial norms). ``compile=True`` runs a sharded bucket eagerly (collectives do not trace into the
compiled graph).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .norms import norm_dtype

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None


# torch ≥ 2.13 names them *_single (the *_tensor names warn)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed_tensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a DTensor (a view that in-place updates reach), else the tensor."""
    return tensor._local_tensor if is_distributed_tensor(tensor) else tensor


def chunk_span(size: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) of rank's chunk of ``size`` under torch.chunk's split (as DTensor's Shard)."""
    per = math.ceil(size / world) if size else 0
    start = min(per * rank, size)
    return start, max(0, min(per, size - start))


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows of one FSDP2-sharded parameter lie."""

    mesh: object  # DeviceMesh
    group: object  # its ProcessGroup
    rank: int
    world: int
    full_shape: tuple[int, ...]
    row_offset: int
    rows: int


def row_shard(param: torch.Tensor, name: str) -> RowShard | None:
    """The parameter's :class:`RowShard`, or None for a plain tensor; a clear error for a DTensor
    the engine cannot step (a mesh of more dimensions, or another placement than ``Shard(0)``)."""
    if not is_distributed_tensor(param):
        return None
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(
            f"parameter {name!r} is a DTensor with mesh of {mesh.ndim} dimension(s) and placements "
            f"{tuple(param.placements)}; SubspaceAdamW supports FSDP2's row sharding: a 1-D mesh and "
            "placements (Shard(0),)")
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    offset, rows = chunk_span(param.shape[0], world, rank)
    if param._local_tensor.shape[0] != rows:
        raise ValueError(f"parameter {name!r}: local shard has {param._local_tensor.shape[0]} rows, expected {rows} "
                         "(torch.chunk's split of dim 0)")
    return RowShard(mesh, group, rank, world, tuple(param.shape), offset, rows)


class CommLog:
    """Counts the elements this rank's collectives moved, per kind, and the seconds spent in them
    (host time: waiting for the other ranks included; on a GPU, the launch only) — ``bench/fsdp.py``,
    tests."""

    active: "CommLog | None" = None

    def __init__(self):
        self.elements: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, kind: str, elements: int, seconds: float = 0.0) -> None:
        self.elements[kind] = self.elements.get(kind, 0) + int(elements)
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    @contextmanager
    def recording(self):
        previous, CommLog.active = CommLog.active, self
        try:
            yield self
        finally:
            CommLog.active = previous


@contextmanager
def _logged(kind: str, elements: int):
    """Count a collective in the active :class:`CommLog` (if any)."""
    if CommLog.active is None:
        yield
        return
    start = time.perf_counter()
    yield
    CommLog.active.add(kind, elements, time.perf_counter() - start)


def all_reduce_(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` over the group, in place."""
    with _logged("all_reduce", tensor.numel()):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


class BucketShard:
    """The collectives of one bucket of same-shape row-sharded matrices (``side`` of the whole shape)."""

    def __init__(self, shard: RowShard, side: str):
        if side == "both":
            raise ValueError("a two-sided projection (proj_type='full') is not supported on sharded parameters: "
                             "use proj_type 'std', 'reverse_std', 'left' or 'right'")
        self.shard, self.side = shard, side
        self.group, self.world, self.rank = shard.group, shard.world, shard.rank
        n = shard.full_shape[1]
        self.columns = n
        self.column_offset, self.local_columns = chunk_span(n, self.world, self.rank)
        self.column_chunk = math.ceil(n / self.world)

    # the low-rank side: rows of R for a right projection, columns for a left one
    @property
    def columns_sharded(self) -> bool:
        return self.side == "left"

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_(tensor, self.group)

    def matrix_norms(self, partial: torch.Tensor) -> torch.Tensor:
        """‖t_b‖ from this rank's part of each matrix (…×m_k×n or R's share), B×1×1, ≥ fp32."""
        sq = torch.linalg.vector_norm(partial, dim=(-2, -1), keepdim=True, dtype=norm_dtype(partial.dtype)).square_()
        return self.sum_(sq).sqrt_()

    def reduce_scatter_columns(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of B×a×n partial sums, this rank keeping its columns: B×a×n_k."""
        chunk, world = self.column_chunk, self.world
        padded = partial
        if chunk * world != partial.shape[-1]:
            padded = torch.nn.functional.pad(partial, (0, chunk * world - partial.shape[-1]))
        pieces = padded.unflatten(-1, (world, chunk)).movedim(-2, 0).contiguous()  # w×B×a×c
        out = torch.empty(pieces.shape[1:], dtype=partial.dtype, device=partial.device)
        with _logged("reduce_scatter", pieces.numel()):
            _REDUCE_SCATTER(out, pieces.flatten(0, 1), group=self.group)
        return out[..., :self.local_columns]

    def all_gather_columns(self, part: torch.Tensor) -> torch.Tensor:
        """Every rank's B×a×n_k columns joined into B×a×n."""
        chunk, world = self.column_chunk, self.world
        if part.shape[-1] != chunk:
            part = torch.nn.functional.pad(part, (0, chunk - part.shape[-1]))
        out = torch.empty((world, *part.shape), dtype=part.dtype, device=part.device)
        with _logged("all_gather", out.numel()):
            _ALL_GATHER(out.flatten(0, 1), part.contiguous(), group=self.group)
        return out.movedim(0, -2).flatten(-2)[..., :self.columns]

    def gather_terms(self, term: torch.Tensor | None, coef: torch.Tensor | None, column_coef: bool):
        """A left projection's low-rank term (B×r×n_k) and, when φ is per column (``column_coef``),
        its factors (B×1×n_k) made whole with one all-gather; a per-matrix factor is already whole."""
        if not self.columns_sharded:
            return term, coef
        gather_coef = column_coef and coef is not None
        parts = [t for t in (term, coef if gather_coef else None) if t is not None]
        if not parts:
            return term, coef
        whole = self.all_gather_columns(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2))
        if term is None:
            return None, whole
        rows = term.shape[-2]
        return whole[..., :rows, :], (whole[..., rows:, :] if gather_coef else coef)


# ---------------------------------------------------------------------------- refresh
def deal(count: int, world: int, first: int = 0) -> list[list[int]]:
    """Round-robin owners: the positions of ``count`` due matrices owned by each rank, position 0 going
    to rank ``first`` (a layer-wise refresh of one matrix passes its ordinal, so the SVDs of successive
    parameters land on successive ranks)."""
    return [list(range((owner - first) % world, count, world)) for owner in range(world)]


def state_split(shard: RowShard | None, side: str | None) -> tuple[int, int] | None:
    """(dim, whole size) along which a parameter's moments are split over the ranks: rows of G (dim 0,
    m) for a plain parameter (``side`` None) or a right projection, columns of R (dim 1, n) for a left
    one; None for a tensor that is not sharded."""
    if shard is None:
        return None
    return (1, shard.full_shape[1]) if side == "left" else (0, shard.full_shape[0])


def gather_rows(stack: torch.Tensor, shard: RowShard, owner: int) -> torch.Tensor | None:
    """The whole matrices (B×m×n) at ``owner`` from every rank's rows (B×m_k×n); None elsewhere."""
    m = shard.full_shape[0]
    chunk = math.ceil(m / shard.world)
    padded = stack
    if stack.shape[-2] != chunk:
        padded = torch.nn.functional.pad(stack, (0, 0, 0, chunk - stack.shape[-2]))
    padded = padded.contiguous()
    pieces = [torch.empty_like(padded) for _ in range(shard.world)] if shard.rank == owner else None
    with _logged("gather", padded.numel()):
        dist.gather(padded, pieces, dst=dist.get_global_rank(shard.group, owner), group=shard.group)
    if pieces is None:
        return None
    rows = [chunk_span(m, shard.world, k)[1] for k in range(shard.world)]
    return torch.cat([piece[..., :n, :] for piece, n in zip(pieces, rows)], dim=-2)


def broadcast(tensor: torch.Tensor, shard: RowShard, owner: int) -> torch.Tensor:
    """``tensor`` of ``owner`` on every rank (in place; the others pass a buffer of its shape)."""
    with _logged("broadcast", tensor.numel()):
        dist.broadcast(tensor, src=dist.get_global_rank(shard.group, owner), group=shard.group)
    return tensor


def local_rows(full: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This rank's rows of a whole m×… tensor, in a storage of their own."""
    return full[shard.row_offset:shard.row_offset + shard.rows].clone()


__all__ = ["RowShard", "BucketShard", "CommLog", "row_shard", "local", "is_distributed_tensor", "chunk_span",
           "state_split", "Replicate", "Shard"]
