"""Update rules: what each matrix's update is made of, in particular the part of the gradient outside
the subspace, G − P·R, that GaLore loses (paper eq. 7–11).

Every rule contributes the same three things, on a whole bucket of same-shape matrices at once::

    update = P·(a·ψ(R))  +  w·c·φ∘(G − κ·P·R)          W ← W·(1 − ηλ) − η·update

``a`` (``subspace_scale``) weighs Adam's direction in the subspace, ``φ`` is the scaling factor of the
residual (None: no residual), ``κ`` what of P·R the residual leaves out, ``w`` a constant weight and
``c`` the limiter's factor (``limiters.py``), computed by the engine from ‖φ∘(G − κ·P·R)‖, which the
rule reports per matrix (``residual_sq``). The engine assembles it as one batched matmul
P·(a·ψ − κ·w·c·φ∘R) plus w·c·φ∘G, so no rule needs a branch in the engine and S is never built.

Rules (``residual=``):

* ``discard``       GaLore: update = α·P·ψ(R)
* ``add``           GaLore-add (Fira w/o scaling): S = G − P·R, unscaled
* ``scale_matrix``  Fira-matrix: φ = ‖ψ(R)‖ / ‖R‖, one per matrix                (eq. 10)
* ``scale_column``  Fira: φ_i = ‖ψ(R)_{:,i}‖ / ‖R_{:,i}‖, one per column of G    (eq. 11)
* ``only_scaling``  Fira-only-scaling (review discussion) and APOLLO (Zhu et al., MLSys 2025,
                    Algorithm 1): update = w·c·φ∘G, no subspace term; φ per column (eq. 11,
                    APOLLO's "channel") or per matrix (eq. 10, "tensor": ``scaling_granularity``),
                    w = ``scaling_multiplier`` (APOLLO's √scale).

The column level takes one factor per column of G that survives the projection (rows for a right
projection). The residual is exactly ``G − P·PᵀG`` (κ = 1) whatever α is; the official ``fira``
package subtracts ``α·P·R`` (κ = α, ``residual_convention="official"``). With orthonormal P each
column satisfies ‖G_i − κ·P·R_i‖² = ‖G_i‖² − (2κ − κ²)·‖R_i‖² (Pythagoras), so ‖S‖ needs norms only.

Adding a rule:

1. write a class with ``name`` and ``contribution(bucket, values) -> Contribution`` (``bucket`` holds
   the stacked ``grads``, ``low`` = R, ``psi`` = ψ(R), ``grad_sq`` = ‖G‖² per matrix and ``side``;
   ``values`` the group's options, ``values.scale`` α among them); declare its hyperparameters in
   ``options`` and its per-matrix state in ``state`` (``base/units.py``: the engine adds the options
   to its defaults and validates them; the bucket reads the state, ``Bucket.state``, and the rule
   returns its new value in ``Contribution.state``); set ``column_level`` if φ is per column (it
   then needs a one-sided projection); take every norm through the bucket's ``matrix_norms``,
   ``column_norms``, ``grad_column_sq`` and ``column_total`` and set ``shard_aware = True``, and the
   rule also runs on FSDP2-sharded weights (``base/shards.py``). A rule whose residual is not
   φ∘(G − κ·P·R) (e.g. FRUGAL's sign) returns it whole in ``Contribution.explicit``, built from
   ``Bucket.residual(κ)``;
2. ``register_rule(MyRule())`` — in its own file, imported before the optimizer is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.norms import column_norms, matrix_norms, norm_dtype
from ..base.options import Option, OptionValues, choice, number
from ..base.units import Registry, Unit
from .projection import add_back_

SCALING_GRANULARITIES = ("column", "tensor")
RESIDUAL_CONVENTIONS = ("exact", "official")

RESIDUAL_CONVENTION = Option("exact", choice(*RESIDUAL_CONVENTIONS),
                             "exact: S = G − P·R; official: G − α·P·R (the fira package's)")

# Added to ‖R‖ in φ's denominator, as the official Fira code does, so that a zero column of R
# (a column of G orthogonal to the subspace) gives a large but finite factor.
PHI_EPS = 1e-8


class Bucket:
    """What a rule reads: a stack of B same-shape matrices and their projections.

    ``grads`` G (B×m×n), ``low`` R = Pᵀ·G (B×r×n), G·Qᵀ (B×m×r) or Pᵀ·G·Qᵀ, ``psi`` ψ(R) (R's shape),
    ``side`` ("left" | "right" | "both"), ``projection`` the stacks (P, Q) (None for an unused side)
    and ``grad_sq`` ‖G_b‖² (B×1×1, ≥ fp32), computed on first use from the norms the step already
    has (``grad_norms``, one 0-d tensor per matrix, or None).

    On FSDP2-sharded matrices (``shard``, ``base/shards.py``) G holds this rank's rows and R, ψ its rows
    (right projection) or columns (left); a rule then takes every norm through the methods below,
    which sum the ranks' parts, and stays exact.
    """

    def __init__(self, grads: torch.Tensor, low: torch.Tensor, psi: torch.Tensor, side: str,
                 projection: tuple = (None, None), grad_norms: list | None = None, shard=None,
                 unit_state: dict | None = None):
        self.grads, self.low, self.psi, self.side = grads, low, psi, side
        self.left, self.right = projection
        self.grad_norms = grad_norms
        self.shard = shard
        self.unit_state = unit_state or {}
        self._grad_sq = None

    def state(self, key: str) -> torch.Tensor:
        """The rule's declared state ``key`` (``Rule.state``), stacked over the bucket (B×…)."""
        return self.unit_state[key]

    def residual(self, kappa: float = 1.0) -> torch.Tensor:
        """G − κ·P·R materialised (B×m×n, a new tensor), for a rule whose residual is not φ∘(G − κ·P·R)."""
        residual = self.grads.clone()
        add_back_(residual, self.low, self.left, self.right, alpha=-kappa)  # (one m×n temporary: the result)
        return residual

    @property
    def grad_sq(self) -> torch.Tensor:
        if self._grad_sq is None:
            dtype = norm_dtype(self.grads.dtype)
            norms = self.grad_norms
            if norms is not None and None not in norms and norms[0].dtype == dtype:
                self._grad_sq = torch.stack(norms).square_().view(-1, 1, 1)
            else:
                self._grad_sq = self.matrix_norms(self.grads).square_()
        return self._grad_sq

    def matrix_norms(self, t: torch.Tensor) -> torch.Tensor:
        """‖t_b‖ of each whole matrix (B×1×1) of ``grads``, ``low``, ``psi`` or a tensor laid out like them."""
        return matrix_norms(t) if self.shard is None else self.shard.matrix_norms(t)

    def column_norms(self, t: torch.Tensor) -> torch.Tensor:
        """Column norms (eq. 11) of ``low``, ``psi`` or a tensor laid out like them: whole on every rank
        (a sharded rank holds whole columns of R for a left projection, whole rows for a right one)."""
        return column_norms(t, self.side)

    @property
    def grad_column_sq(self) -> torch.Tensor:
        """Squared column norms of G matching ``column_norms``' columns (summed over the ranks' rows)."""
        sq = column_norms(self.grads, self.side).square_()
        if self.shard is not None and self.shard.columns_sharded:
            sq = self.shard.reduce_scatter_columns(sq)
        return sq

    def column_total(self, terms: torch.Tensor) -> torch.Tensor:
        """Σ of per-column terms (B×1×n or B×m×1) per matrix, shape (B,), over all ranks' columns."""
        total = terms.sum(dim=(-2, -1))
        return total if self.shard is None else self.shard.sum_(total)


@dataclass
class Contribution:
    """A rule's share of the update (see the module docstring)."""

    subspace_scale: float  # a in P·(a·ψ)
    phi: torch.Tensor | None = None  # φ, broadcastable to G and R; None: no residual term
    kappa: float = 0.0  # the residual is φ∘(G − κ·P·R)
    residual_sq: torch.Tensor | None = None  # ‖φ∘(G − κ·P·R)‖² per matrix, shape (B,)
    weight: float = 1.0  # w on the limited residual
    explicit: torch.Tensor | None = None  # the residual term itself (B×m×n), which φ (often 1) then scales, κ = 0
    state: dict | None = None  # the rule's new state (key → stacked tensor), written back by the engine


class Rule(Unit):
    """Base class of update rules. ``options`` and ``state`` as every unit declares them
    (``base/units.py``); a rule reads its options, the group's ``scale`` α among them, from the
    ``values`` it is given, and its per-matrix state through the bucket."""

    name = ""
    column_level = False  # φ per column of G (needs a one-sided projection)
    has_residual = True  # contributes a residual term (which the limiter sees)
    projects_back = True  # its update has a term P·X (else P is only read: APOLLO's may be regenerated)
    shard_aware = False  # takes every norm through the Bucket's methods (so it runs on FSDP2 shards)

    def uses_columns(self, values: OptionValues) -> bool:
        return self.column_level

    def validate(self, values: OptionValues) -> None:
        if self.uses_columns(values) and values.proj_type == "full":
            raise ValueError(f"residual={self.name!r} scales columns and needs a one-sided projection; proj_type must "
                             "be one of ('std', 'reverse_std', 'left', 'right'), got 'full'")

    def contribution(self, bucket: Bucket, values: OptionValues) -> Contribution:
        raise NotImplementedError


def _kappa(values: OptionValues) -> float:
    return values.scale if values.residual_convention == "official" else 1.0


def _scaled(bucket: Bucket, phi: torch.Tensor, sq_g: torch.Tensor, sq_r: torch.Tensor, kappa: float,
            columns: bool = False) -> torch.Tensor:
    """Σ φ²·(‖G_i‖² − (2κ − κ²)·‖R_i‖²) per matrix (Pythagoras, clamped at 0 against rounding), over
    the columns i (``columns``) or of whole matrices."""
    share = 2.0 * kappa - kappa * kappa
    residual = (sq_g - sq_r if share == 1.0 else sq_g - share * sq_r).clamp_min_(0.0).mul_(phi.square())
    return bucket.column_total(residual) if columns else residual.sum(dim=(-2, -1))


class Discard(Rule):
    name = "discard"
    has_residual = False
    shard_aware = True

    def contribution(self, bucket, values):
        return Contribution(subspace_scale=values.scale)


class Add(Rule):
    """GaLore-add (Fira w/o scaling): S = G − κ·P·R, φ = 1."""

    name = "add"
    shard_aware = True
    options = {"residual_convention": RESIDUAL_CONVENTION}

    def phi(self, bucket: Bucket, low_norm: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(bucket.grad_sq)

    def contribution(self, bucket, values):
        kappa = _kappa(values)
        low_norm = bucket.matrix_norms(bucket.low)
        phi = self.phi(bucket, low_norm)
        return Contribution(values.scale, phi, kappa, _scaled(bucket, phi, bucket.grad_sq, low_norm.square(), kappa))


class ScaleMatrix(Add):
    """Fira-matrix: φ = ‖ψ(R)‖ / ‖R‖, one per matrix (eq. 10)."""

    name = "scale_matrix"

    def phi(self, bucket, low_norm):
        return bucket.matrix_norms(bucket.psi) / (low_norm + PHI_EPS)  # eq. 10


class ScaleColumn(Rule):
    name = "scale_column"
    column_level = True
    shard_aware = True
    options = {"residual_convention": RESIDUAL_CONVENTION}

    def contribution(self, bucket, values):
        kappa = _kappa(values)
        low_norm = bucket.column_norms(bucket.low)
        phi = bucket.column_norms(bucket.psi) / (low_norm + PHI_EPS)  # eq. 11
        return Contribution(values.scale, phi, kappa,
                            _scaled(bucket, phi, bucket.grad_column_sq, low_norm.square_(), kappa, columns=True))


class OnlyScaling(Rule):
    name = "only_scaling"
    shard_aware = True
    projects_back = False
    options = {
        "scaling_granularity": Option("column", choice(*SCALING_GRANULARITIES),
                                      "column: φ per column (eq. 11, APOLLO's channel); tensor: one φ (eq. 10)"),
        "scaling_multiplier": Option(1.0, number(0.0, low_open=True), "multiplies the limited update (APOLLO's √scale)"),
    }

    def uses_columns(self, values):
        return values.scaling_granularity == "column"

    def contribution(self, bucket, values):
        if self.uses_columns(values):
            phi = bucket.column_norms(bucket.psi) / (bucket.column_norms(bucket.low) + PHI_EPS)
            residual_sq = bucket.column_total(phi.square() * bucket.grad_column_sq)
        else:
            phi = bucket.matrix_norms(bucket.psi) / (bucket.matrix_norms(bucket.low) + PHI_EPS)
            residual_sq = (phi.square() * bucket.grad_sq).sum(dim=(-2, -1))
        return Contribution(0.0, phi, 0.0, residual_sq, weight=values.scaling_multiplier)


RULE_REGISTRY = Registry("rule", "residual", Rule)


def register_rule(rule: Rule) -> None:
    """Make ``rule`` available as ``residual=rule.name`` in every group."""
    RULE_REGISTRY.register(rule)


for _rule in (Discard(), Add(), ScaleMatrix(), ScaleColumn(), OnlyScaling()):
    register_rule(_rule)


def get_rule(name: str) -> Rule:
    return RULE_REGISTRY.get(name)
