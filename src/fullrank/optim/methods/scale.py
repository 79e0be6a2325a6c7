"""SCALE (Glentis, Li, Han & Hong, "A Minimalist Optimizer Design for LLM Pretraining", arXiv 2506.16659,
ICML 2026): column-normalised SGD, with first-order momentum on the last layer only.

Algorithm 1 of the paper, for every layer l at step t with stochastic gradient g_l^t:

    m_l^t = β·m_l^{t−1} + (1 − β)·g_l^t     if l = L (the last layer: the output projection, lm_head)
    m_l^t = g_l^t                            otherwise (no state)
    θ_l^{t+1} = θ_l^t − η·C(m_l^t)           C: column-wise normalisation

"Column" is the paper's: normalising along the output dimension, one factor per output feature. The
authors' code (OptimAI-Lab/Minimalist_LLM_Pretraining, ``mem_eff_pt/pt_scale/scale_optimizer.py``)
fixes what the algorithm leaves open, and this implementation follows it:

* C divides each output feature's slice by its RMS, floored at ``norm_eps`` (10⁻⁸):
  C(M) = M / max(RMS, ε), RMS the root mean square over the feature's slice — ‖·‖₂/√d, d its length —
  so the update has unit RMS per feature, like an Adam update, and Adam's learning rates carry over
  (the paper's lr is 10⁻³ at 60M–350M, 2·10⁻⁴ at 1B). For an ``nn.Linear`` weight (out × in) the
  features are its **rows** (the mean runs over the input dimension, dim 1); for the token embedding
  (vocab × hidden, whose output is the hidden vector) they are its **columns** (the mean runs over the
  vocabulary, dim 0). A tensor of more than two dimensions is normalised as ``view(size(0), -1)``.
* The last layer is ``lm_head`` (the parameters whose name contains a ``last_layer`` substring); its
  momentum is the EMA above (β = ``momentum``, 0.9), started at zero (C is scale-invariant, so no bias
  correction is needed) and normalised like the other matrices (rows).
* Vectors (norm weights, biases) are trained by Adam (β1, β2 = ``betas``, ε = ``eps`` added to √v
  before the bias correction: W ← W − η_a·(m/(1−β1ᵗ)) / ((√v + ε)/√(1−β2ᵗ))) at the learning rate
  η_a = η·``adam_lr``/η₀ (η₀ the constructor's lr: ``adam_lr`` follows η's schedule; None: η_a = η).
* Weight decay is decoupled, W ← W·(1 − ηλ) before the update (η_a for the vectors).

Memory: one state tensor the size of ``lm_head`` plus Adam's two moments of the vectors — against
AdamW's two moments of every parameter; with the weights counted, 35–45 % of Adam's memory at 60M–1B
(the paper's 60M–1B results table, bf16 weights + states: 0.15 against 0.35 GB at 60M, 2.81 against
8.04 GB at 1B; ``tests/test_scale.py`` recounts these from the roles).

Which parameter is which (``roles()``): with ``fullrank.param_groups`` the projected group's attention
and MLP weights are "matrix"; in the plain group, a name containing an ``embedding`` substring
(``embed_tokens``) is "embedding", one containing a ``last_layer`` substring (``lm_head``) is
"last_layer" and any 1-D parameter is "vector"; any other ≥2-D parameter is "matrix". Names come from
the groups' ``param_names`` (``param <k>`` without them, then no parameter is the last layer and SCALE
is column-normalised SGD throughout: a warning says so). A tied ``lm_head`` is the embedding's tensor,
named ``embed_tokens``, and is normalised as the embedding, without momentum (as in the authors' code).
The groups' projection keys (``rank``, ``update_proj_gap``, ...) are ignored.

FSDP2 (parameters as DTensors, ``Shard(0)`` on a 1-D mesh): the updates are the unsharded ones. A
row's RMS and the momentum and Adam updates are local; the embedding's column RMS sums the squares of
its rows over the processes (one all-reduce of ``hidden`` numbers per step), and the non-finite check
all-reduces one flag per parameter so that every process takes the same decision. State tensors are
DTensors laid out like their parameters, and every parameter's state counts its steps (a plain int;
torch's DCP state dict of an optimizer, which ``fullrank pretrain --fsdp`` saves and resumes, wants a
state for each parameter).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from torch.optim import Optimizer

from ..base import closure as closures
from ..base import host
from ..base.options import Option, check_range, integer, number, optional, resolve
from ..base.shards import all_reduce_, is_distributed_tensor, local, row_shard
from ..core.buckets import DEFAULT_BUCKET_CAP_MB, MIB
from ..core.finiteness import NonFiniteGradientError
from ..core.group_options import COMMON
from ..core.plan import parameter_names

logger = logging.getLogger(__name__)

PAPER_LR = 1e-3
SCALE_MOMENTUM = 0.9
NORM_EPS = 1e-8
LAST_LAYER_NAMES = ("lm_head",)
EMBEDDING_NAMES = ("embed_tokens",)
ROLES = ("matrix", "embedding", "last_layer", "vector")


def _names_option(key: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a list of non-empty parameter-name substrings, got {value!r}")
    return tuple(value)


def _names(key: str, value) -> None:
    _names_option(key, value)


def _states(key: str, value) -> None:
    if value not in (None, "32bit"):
        raise ValueError(f"{key}={value!r} is not available for SCALE: its state keeps the parameters' "
                         "dtype (states='32bit')")


SCALE_OPTIONS = {
    "momentum": Option(SCALE_MOMENTUM, number(0.0, 1.0, high_open=True), "β of the last layer's momentum"),
    "adam_lr": Option(None, optional(number(0.0)), "the vectors' Adam lr (None: lr); follows lr's schedule"),
    "last_layer": Option(LAST_LAYER_NAMES, _names, "name substrings of the last layer (momentum)"),
    "embedding": Option(EMBEDDING_NAMES, _names, "name substrings of the embedding (normalised over columns)"),
    "norm_eps": Option(NORM_EPS, number(0.0, low_open=True), "floor of each feature's RMS"),
    "nonfinite": COMMON["nonfinite"],
    "bucket_cap_mb": COMMON["bucket_cap_mb"],
    "states": Option(None, _states, "'32bit' only: the state keeps the parameters' dtype"),
    "seed": Option(0, integer(), "accepted and unused: SCALE draws nothing"),
}


def role_of(name: str, ndim: int, last_layer, embedding) -> str:
    """The SCALE role of a parameter (see the module doc)."""
    if ndim < 2:
        return "vector"
    if any(s in name for s in embedding):
        return "embedding"
    if any(s in name for s in last_layer):
        return "last_layer"
    return "matrix"


class SCALE(Optimizer):
    """SCALE: column-normalised SGD with momentum on the last layer only (module doc; Algorithm 1).

    The signature is the presets' (``make_optimizer("scale", groups, lr=, betas=, eps=, weight_decay=)``);
    ``betas`` and ``eps`` are Adam's for the vectors, ``momentum`` is the last layer's β. Options:
    ``adam_lr`` (the vectors' lr; None: ``lr``), ``last_layer`` and ``embedding`` (name substrings),
    ``norm_eps`` (floor of the RMS), ``nonfinite`` ("raise": :class:`NonFiniteGradientError` naming
    the parameter, nothing changed; "skip": the step is skipped and counted in ``skipped_steps``),
    ``bucket_cap_mb`` (same-shape matrices normalised together up to this many MiB of stacked
    gradient; None: one matrix at a time on the CPU, 256 MiB elsewhere). ``states`` accepts only
    "32bit" (the state keeps the parameters' dtype); ``seed`` is accepted and unused (SCALE draws
    nothing). The paper's learning rates are 10⁻³ (60M–350M) and 2·10⁻⁴ with ``adam_lr`` 10⁻³ (1B);
    ``make_optimizer``'s default (10⁻², Fira's) is too large for SCALE.
    """

    @staticmethod
    def option_table() -> dict[str, tuple]:
        """{option: (default, meaning)} of SCALE's options beside the presets' lr, betas, eps, weight_decay."""
        return {name: (option.default, option.doc) for name, option in sorted(SCALE_OPTIONS.items())}

    def __init__(self, params, lr: float = PAPER_LR, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options):
        options = resolve(type(self).__name__, SCALE_OPTIONS, options)
        check_range("lr", lr, 0.0, math.inf)
        adam_lr = options["adam_lr"]
        adam_lr_ratio = 1.0 if adam_lr is None or lr == 0 else adam_lr / lr
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "momentum": options["momentum"], "adam_lr_ratio": adam_lr_ratio,
                    "last_layer": options["last_layer"], "embedding": options["embedding"],
                    "norm_eps": options["norm_eps"], "nonfinite": options["nonfinite"],
                    "bucket_cap_mb": options["bucket_cap_mb"]}
        super().__init__(params, defaults)
        self.skipped_steps = 0
        offset = 0
        for group in self.param_groups:
            self._validate_group(group, offset)
            offset += len(group["params"])
        self._warned = False

    def _warn_without_last_layer(self) -> None:
        """Once, at the first step (not at construction: ``--help-optim`` probes an unnamed parameter)."""
        self._warned = True
        if not any(role == "last_layer" for role in self.roles().values()):
            logger.warning("SCALE: no parameter name contains any of %s: no parameter gets momentum (column-"
                           "normalised SGD throughout); pass param_names or last_layer=[...]",
                           sorted({s for g in self.param_groups for s in g["last_layer"]}))

    # ------------------------------------------------------------------ options and roles
    @staticmethod
    def _validate_group(group: dict, offset: int = 0) -> None:
        for key in ("lr", "betas", "eps", "weight_decay", "nonfinite", "bucket_cap_mb"):  # the engine's checks
            COMMON[key].check(key, group[key])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("adam_lr / lr", group["adam_lr_ratio"], 0.0, math.inf)
        check_range("norm_eps", group["norm_eps"], 0.0, math.inf, low_open=True)
        group["last_layer"] = _names_option("last_layer", group["last_layer"])
        group["embedding"] = _names_option("embedding", group["embedding"])
        for p, name in zip(group["params"], parameter_names(group, offset)):
            if is_distributed_tensor(p):
                row_shard(p, name)  # a clear error unless FSDP2's Shard(0) on a 1-D mesh

    def _named(self):
        """(group, parameter, name, role) of every parameter."""
        offset = 0
        for group in self.param_groups:
            for p, name in zip(group["params"], parameter_names(group, offset)):
                yield group, p, name, role_of(name, p.dim(), group["last_layer"], group["embedding"])
            offset += len(group["params"])

    def roles(self) -> dict[str, str]:
        """{parameter name: "matrix" | "embedding" | "last_layer" | "vector"}."""
        return {name: role for _, _, name, role in self._named()}

    # ------------------------------------------------------------------ state dict
    def __getstate__(self) -> dict:
        """torch keeps defaults, state and param_groups; the skip count and the warning's flag come along."""
        return {**super().__getstate__(), "skipped_steps": self.skipped_steps, "_warned": self._warned}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)  # (pickles of earlier versions held neither)
        self.__dict__.setdefault("_warned", False)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        offset = 0
        for group in self.param_groups:
            self._validate_group(group, offset)
            offset += len(group["params"])
        self.skipped_steps = skipped

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One step of Algorithm 1; returns the closure's loss if one is given."""
        loss = closures.evaluate(closure)
        if not self._warned:
            self._warn_without_last_layer()
        work = []
        for group, p, name, role in self._named():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"SCALE does not support sparse gradients (parameter {name!r})")
            work.append((group, p, name, role))
        if not work or not self._finite(work):
            return loss
        by_group: dict[int, tuple[dict, list]] = {}
        for group, p, name, role in work:
            state = self.state[p]  # every parameter counts its steps: DCP's resume expects a state for each
            state["step"] = state.get("step", 0) + 1
            by_group.setdefault(id(group), (group, []))[1].append((p, name, role))
        for group, items in by_group.values():
            vectors = [p for p, _, role in items if role == "vector"]
            if vectors:
                self._adam(group, vectors)
            matrices = [(p, role) for p, _, role in items if role != "vector"]
            if matrices:
                self._normalised_sgd(group, matrices)
        return loss

    def _finite(self, work) -> bool:
        """True when every gradient is finite (one host read per device); else raise or count a skip."""
        grads: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        sharded_groups = {}
        for _, p, name, _ in work:
            grads[local(p.grad).device].append(local(p.grad))
            if is_distributed_tensor(p):
                shard = row_shard(p, name)
                sharded_groups[id(shard.group)] = shard.group
        if len(sharded_groups) > 1:
            raise ValueError("SCALE under FSDP2: every sharded parameter must lie on the same 1-D device mesh")
        group = next(iter(sharded_groups.values()), None)
        finite = True
        for device, tensors in grads.items():
            # a finite 2-norm proves every entry finite (NaN and ±inf propagate into the sum of squares)
            bad = (~torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2)))).any().to(torch.float32).reshape(1)
            if group is not None:
                all_reduce_(bad, group)
            finite = finite and not host.read(bad, [False])[0]
        if finite:
            return True
        # rare path: find the parameter (exactly: the norm may also have overflowed on finite entries)
        flags = torch.tensor([0.0 if bool(torch.isfinite(local(p.grad)).all()) else 1.0 for _, p, _, _ in work])
        if group is not None:
            all_reduce_(flags, group)
        hits = flags.nonzero().flatten().tolist()
        if not hits:
            return True
        bad_group, _, bad_name, _ = work[hits[0]]
        if bad_group["nonfinite"] == "skip":
            self.skipped_steps += 1
            return False
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in parameter {bad_name!r}; no weight or optimizer state "
            "was changed. Use nonfinite='skip' to skip such steps instead.")

    def _adam(self, group: dict, params: list[torch.Tensor]) -> None:
        """Adam on the vectors (norm weights, biases), the authors' convention (module doc)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["adam_lr_ratio"]
        weights, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            weights.append(local(p))
            grads.append(local(p.grad))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(weights, 1.0 - lr * group["weight_decay"])
        sizes = [-lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t) for t in steps]
        torch._foreach_addcdiv_(weights, exp_avgs, denom, sizes)

    def _normalised_sgd(self, group: dict, matrices: list[tuple[torch.Tensor, str]]) -> None:
        """θ ← θ·(1 − ηλ) − η·C(m), m the gradient or, for the last layer, its momentum (Algorithm 1)."""
        lr, beta = group["lr"], group["momentum"]
        last = [p for p, role in matrices if role == "last_layer"]
        if last:
            buffers = []
            for p in last:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(local(state["exp_avg"]))
            torch._foreach_lerp_(buffers, [local(p.grad) for p in last], 1.0 - beta)
        buckets: dict[tuple, list] = defaultdict(list)
        shards = {}
        for p, role in matrices:
            direction = local(self.state[p]["exp_avg"]) if role == "last_layer" else local(p.grad)
            over_rows = role == "embedding"  # the embedding's features are its columns (module doc)
            shard = row_shard(p, "") if is_distributed_tensor(p) and over_rows else None
            shard_key = None if shard is None else (id(shard.group), shard.full_shape)
            shards[shard_key] = shard
            key = (over_rows, tuple(direction.shape), direction.dtype, direction.device, shard_key)
            buckets[key].append((p, direction))
        weights = [local(p) for p, _ in matrices]
        if group["weight_decay"]:
            torch._foreach_mul_(weights, 1.0 - lr * group["weight_decay"])
        for (over_rows, shape, _, device, shard_key), members in buckets.items():
            shard = shards[shard_key]
            cap = group["bucket_cap_mb"]
            if cap is None:
                cap = 0.0 if device.type == "cpu" else DEFAULT_BUCKET_CAP_MB
            per = max(1, int(cap * MIB // max(1, 4 * math.prod(shape))))  # float32 bytes
            for start in range(0, len(members), per):
                chunk = members[start:start + per]
                # low-precision directions are normalised in float32, float64 ones in float64
                compute = torch.promote_types(chunk[0][1].dtype, torch.float32)
                stack = torch.stack([d.to(compute).reshape(d.shape[0], -1) for _, d in chunk])
                updates = self._column_normalise(stack, over_rows, shard, group["norm_eps"])
                targets = [local(p) for p, _ in chunk]
                deltas = [u.reshape(t.shape).to(t.dtype) for u, t in zip(updates.unbind(0), targets)]
                torch._foreach_add_(targets, deltas, alpha=-lr)

    @staticmethod
    def _column_normalise(stack: torch.Tensor, over_rows: bool, shard, eps: float) -> torch.Tensor:
        """C(M) = M / max(RMS, ε) per output feature of each matrix of ``stack`` (B × rows × cols): the
        RMS of each row, or with ``over_rows`` of each column (summed over the processes for a sharded
        embedding)."""
        if not over_rows:
            ms = stack.square().mean(dim=-1, keepdim=True)
        else:
            ss = stack.square().sum(dim=-2, keepdim=True)
            rows = stack.shape[-2]
            if shard is not None:
                all_reduce_(ss, shard.group)
                rows = shard.full_shape[0]
            ms = ss / rows
        return stack / ms.sqrt_().clamp_min_(eps)
