"""Where P comes from (``projector=``), and P as the projector's state.

* ``svd``     P fitted to the gradient by the group's SVD backend (``svd.py``): GaLore, Fira,
              AdaRankGrad. Stored: ``proj_left`` P (m×r) and/or ``proj_right`` Q (r×n).
* ``random``  P drawn at each refresh from a generator seeded by ``projection_seed`` (the group's
              ``seed``, the parameter's ordinal, the refresh step), so a resumed run draws the same
              matrices; drawn in fp32 (as ``apollo-torch`` does) and cast to the gradient's dtype:

  - :func:`gaussian_projection`, APOLLO (Zhu et al., MLSys 2025, Algorithm 1 and its package
    ``apollo-torch``): entries i.i.d. N(0, 1/r). It is not orthonormal, but E‖Pᵀx‖² = ‖x‖²
    (Johnson–Lindenstrauss), which is all APOLLO's scaling factor needs; it is drawn for a rule
    that never projects back (``only_scaling``). ``projection_storage`` says where it lives:
    ``"seed"`` stores the seed (an int) and regenerates P from it at every step (the r·min(m, n)
    projection costs no memory, one Gaussian draw per step instead), ``"matrix"`` stores P (no
    draw in the step). Both give the same P, bit for bit.
  - :func:`orthonormal_random_projection`, GoLore (He et al., 2024): a basis drawn uniformly from
    the Stiefel manifold (QR of a Gaussian with the signs of R's diagonal, Mezzadri 2007), for the
    other rules: they need an orthonormal P (P·Pᵀ must be a projector for G − P·R to be the
    residual) and project back at every step, so that matrix is stored like an SVD's.

A projector gives a bucket its stacked projections (:meth:`Projector.stacked`).
"""
from __future__ import annotations

import math

import torch

from ..base import shards
from ..base.counters import STEP
from ..base.options import Option, OptionValues, choice
from ..base.seeds import projection_seed
from ..base.units import Registry, Unit
from .projection import projection_side
from .rules import RULE_REGISTRY

PROJ_LEFT, PROJ_RIGHT = "proj_left", "proj_right"  # P (m×r) and Q (r×n), the gradient's dtype
PROJ_SEED = "proj_seed"  # int: the seed APOLLO's Gaussian P is regenerated from (projection_storage="seed")
PROJECTION_STORAGES = ("seed", "matrix")


def gaussian_projection(shape: tuple[int, int], side: str, rank: int, seed: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """APOLLO's sketch: ``(proj_left, proj_right)`` with N(0, 1/r) entries, the unused side None."""
    m, n = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    draw = lambda size: (  # noqa: E731
        torch.randn(size, generator=generator, device=device, dtype=torch.float32).div_(math.sqrt(rank))
    ).to(dtype)
    left = draw((m, rank)) if side in ("left", "both") else None
    right = draw((rank, n)) if side in ("right", "both") else None
    return left, right


def _haar_basis(rows: int, rank: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """rows×rank with orthonormal columns, uniformly distributed (QR with R's diagonal made positive)."""
    Q, R = torch.linalg.qr(torch.randn(rows, rank, generator=generator, device=device, dtype=torch.float32))
    return (Q * torch.sgn(torch.diagonal(R)).unsqueeze(0)).contiguous()


def orthonormal_random_projection(shape: tuple[int, int], side: str, rank: int, seed: int, device: torch.device,
                                  dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GoLore's basis: ``(proj_left, proj_right)`` orthonormal (PᵀP = I, Q·Qᵀ = I), each in its own storage."""
    m, n = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    left = _haar_basis(m, rank, generator, device).to(dtype) if side in ("left", "both") else None
    right = _haar_basis(n, rank, generator, device).T.contiguous().to(dtype) if side in ("right", "both") else None
    return left, right


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class Projector(Unit):
    """``fitted``: P is computed from the gradient (by the group's ``svd`` backend); else ``draw``
    gives (item, state, left, right, seed) for each due (item, state) pair. Its state is P."""

    fitted = True
    state = {PROJ_LEFT: None, PROJ_RIGHT: None}  # (made at a refresh)

    def kept_dtype_keys(self) -> tuple[str, ...]:
        return ()  # P is in the gradient's dtype: a loaded P is cast to the parameter's, as torch does

    def seed_only(self, values: OptionValues) -> bool:
        """The group keeps each matrix's seed, not its P, and regenerates P in every step."""
        return False

    def stacked(self, values: OptionValues, members: list, states: list[dict], side: str):
        """(left, right) stacks of a bucket's projections (None for an unused side)."""
        left = _stack([s[PROJ_LEFT] for s in states]) if side in ("left", "both") else None
        right = _stack([s[PROJ_RIGHT] for s in states]) if side in ("right", "both") else None
        return left, right

    def check_loaded(self, state: dict, name: str, values: OptionValues) -> None:
        """A loaded state's P fits this projector (a seed needs a projector that regenerates it)."""
        if PROJ_SEED in state:
            raise ValueError(f"optimizer state of {name!r} holds a projection seed: it was saved with "
                             "projector='random' and residual='only_scaling', this group does not use them")

    def adopt(self, state: dict, values: OptionValues, param: torch.Tensor, shard) -> None:
        """Bring a checked, loaded P to this projector's form (nothing to do: P is stored)."""


class FittedProjector(Projector):
    """The top-r singular subspace of the gradient (GaLore, Fira, AdaRankGrad)."""

    name = "svd"


class RandomProjector(Projector):
    """A random P, redrawn at every refresh from the group's seed (APOLLO, GoLore)."""

    name = "random"
    fitted = False
    options = {"projection_storage": Option("seed", choice(*PROJECTION_STORAGES),
                                            "APOLLO's Gaussian P (projector='random', residual='only_scaling'): "
                                            "regenerated from its seed in every step, or stored")}
    state = {PROJ_LEFT: None, PROJ_RIGHT: None, PROJ_SEED: None}

    def draws_gaussian(self, values: OptionValues) -> bool:
        """APOLLO's Gaussian sketch, for a rule that never projects back; else GoLore's orthonormal basis."""
        return not RULE_REGISTRY.get(values.residual).projects_back

    def seed_only(self, values):
        return self.draws_gaussian(values) and values.projection_storage == "seed"

    def validate(self, values):
        if values.rank_energy is not None:
            raise ValueError("rank_energy (adaptive rank) reads the gradient's spectrum and needs projector='svd', "
                             f"got projector={self.name!r}")
        if values.refresh_threshold > 0:
            raise ValueError("refresh_threshold > 0 (convergence-triggered refresh) needs projector='svd': a random "
                             "subspace captures a share of the gradient set by its dimensions, not by convergence "
                             f"(got projector={self.name!r})")
        if self.draws_gaussian(values) and values.on_switch in ("reproject", "ldadam"):
            raise ValueError(f"on_switch={values.on_switch!r} needs an orthonormal projection; with projector='random' "
                             "and residual='only_scaling' P is APOLLO's Gaussian sketch: on_switch must be one of "
                             "('keep', 'reset')")

    def draw(self, values: OptionValues, pairs, shape, side) -> list:
        """APOLLO's seeds or Gaussian P, or GoLore's orthonormal bases, one per matrix, drawn from the seed
        alone (the same on every rank of a sharded matrix)."""
        out = []
        for item, state in pairs:
            seed = projection_seed(values.seed, item.ordinal, state[STEP])
            if self.seed_only(values):
                out.append((item, state, None, None, seed))
                continue
            draw = gaussian_projection if self.draws_gaussian(values) else orthonormal_random_projection
            left, right = draw(shape, side, values.rank, seed, item.grad.device, item.grad.dtype)
            out.append((item, state, left, right, None))
        return out

    def stacked(self, values, members, states, side):
        if not self.seed_only(values):
            return super().stacked(values, members, states, side)
        return _regenerated(values.rank, members, states, side)

    def check_loaded(self, state, name, values):
        seed = state.get(PROJ_SEED)
        if seed is None:
            if self.seed_only(values) and (PROJ_LEFT in state or PROJ_RIGHT in state):
                raise ValueError(f"optimizer state of {name!r} holds APOLLO's P, this group regenerates P from a "
                                 "seed (projection_storage='seed'); load it with projection_storage='matrix'")
            return
        if not self.draws_gaussian(values):
            super().check_loaded(state, name, values)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"optimizer state of {name!r}: proj_seed must be an int, got {seed!r}")

    def adopt(self, state: dict, values: OptionValues, param: torch.Tensor, shard) -> None:
        """A loaded seed becomes the P it stands for when this group stores P (``projection_storage``)."""
        seed = state.get(PROJ_SEED)
        if seed is None or self.seed_only(values) or not self.draws_gaussian(values):
            return
        shape, local = tuple(param.shape), shards.local(param)
        side = projection_side(values.proj_type, shape)
        left, right = gaussian_projection(shape, side, values.rank, seed, local.device, local.dtype)
        if shard is not None and left is not None:
            left = shards.local_rows(left, shard)
        del state[PROJ_SEED]
        state.update({key: value for key, value in ((PROJ_LEFT, left), (PROJ_RIGHT, right)) if value is not None})


def _regenerated(rank: int, members: list, states: list[dict], side: str):
    """APOLLO's Gaussian P of a bucket regenerated from each matrix's seed (into one buffer)."""
    shape, shard = members[0].full_shape, members[0].shard
    device, dtype = members[0].grad.device, members[0].grad.dtype
    if len(members) == 1:
        left, right = gaussian_projection(shape, side, rank, states[0][PROJ_SEED], device, dtype)
        if shard is not None and left is not None:
            left = shards.local_rows(left, shard)
        return (None if left is None else left.unsqueeze(0)), (None if right is None else right.unsqueeze(0))
    m, n = shape
    sizes = [size for use, size in ((side in ("left", "both"), (m, rank)), (side in ("right", "both"), (rank, n))) if use]
    buffers = [torch.empty((len(members), *size), dtype=torch.float32, device=device) for size in sizes]
    for b, state in enumerate(states):  # the only per-matrix op of a steady step: APOLLO's draw
        generator = torch.Generator(device=device).manual_seed(state[PROJ_SEED])
        for size, buffer in zip(sizes, buffers):  # left first, as gaussian_projection draws
            torch.randn(size, generator=generator, device=device, dtype=torch.float32, out=buffer[b])
    stacks = [buffer.div_(math.sqrt(rank)).to(dtype) for buffer in buffers]
    left = stacks.pop(0) if side in ("left", "both") else None
    right = stacks.pop(0) if side in ("right", "both") else None
    if shard is not None and left is not None:
        left = left[:, shard.row_offset:shard.row_offset + shard.rows]
    return left, right


PROJECTOR_REGISTRY = Registry("projector", "projector", Projector)
for _projector in (FittedProjector(), RandomProjector()):
    PROJECTOR_REGISTRY.register(_projector)
