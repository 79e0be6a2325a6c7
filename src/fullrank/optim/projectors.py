"""Where P comes from (``projector=``): fitted to the gradient by an SVD backend (``svd.py``), or drawn
at random from a seed (``random_proj.py``: APOLLO's Gaussian sketch, GoLore's random basis)."""
from __future__ import annotations

from . import state as S
from .components import Component, Registry
from . import random_proj
from .random_proj import orthonormal_random_projection, stores_seed_only


class Projector(Component):
    """``fitted``: P is computed from the gradient (by the group's ``svd`` backend); else ``draw``
    gives (item, state, left, right, seed) for each due (item, state) pair."""

    fitted = True


class FittedProjector(Projector):
    """The top-r singular subspace of the gradient (GaLore, Fira, AdaRankGrad)."""

    name = "svd"


class RandomProjector(Projector):
    """A random P, redrawn at every refresh from the group's seed (APOLLO, GoLore)."""

    name = "random"
    fitted = False

    def validate(self, group):
        if group.get("rank_energy") is not None:
            raise ValueError("rank_energy (adaptive rank) reads the gradient's spectrum and needs projector='svd', "
                             f"got projector={self.name!r}")
        if group["refresh_threshold"] > 0:
            raise ValueError("refresh_threshold > 0 (convergence-triggered refresh) needs projector='svd': a random "
                             "subspace captures a share of the gradient set by its dimensions, not by convergence "
                             f"(got projector={self.name!r})")
        if stores_seed_only(group) and group["on_switch"] in ("reproject", "ldadam"):
            raise ValueError(f"on_switch={group['on_switch']!r} needs an orthonormal projection; with projector='random' and "
                             "residual='only_scaling' P is APOLLO's Gaussian sketch: on_switch must be one of "
                             "('keep', 'reset')")

    def draw(self, group: dict, pairs, shape, side) -> list:
        """APOLLO's seeds (seed-only groups) or GoLore's stored orthonormal bases, one per matrix, drawn
        from the seed alone (the same on every rank of a sharded matrix)."""
        out = []
        for item, state in pairs:
            seed = random_proj.projection_seed(group["seed"], item.ordinal, state[S.STEP])
            if stores_seed_only(group):
                out.append((item, state, None, None, seed))
            else:
                left, right = orthonormal_random_projection(shape, side, group["rank"], seed, item.grad.device, item.grad.dtype)
                out.append((item, state, left, right, None))
        return out


PROJECTOR_REGISTRY = Registry("projector", "projector", Projector)
for _projector in (FittedProjector(), RandomProjector()):
    PROJECTOR_REGISTRY.register(_projector)
