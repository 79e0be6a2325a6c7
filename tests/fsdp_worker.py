"""Worker of tests/test_fsdp.py: fullrank optimizers on a tiny LLaMA under FSDP2 (gloo, CPU), beside
the same optimizer on the unsharded model in the same process. Rank 0 writes what it measured as JSON.

Run by ``torch.multiprocessing.spawn`` (``python -m`` is not needed): ``main(rank, world, init_file,
out_dir, phase)``; phase "sharded" (2 ranks: equivalence, state size, communication, save and resume)
or "reshard" (1 rank: resume the 2-rank checkpoint on another world size).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from fullrank.optim import layerwise, make_optimizer, param_groups
from fullrank.optim.base.shards import CommLog
from fullrank.train.distributed import cleanup

VOCAB, HIDDEN, INTERMEDIATE, RANK, GAP = 61, 36, 51, 8, 3
STEPS = 7
RESUMED = ("fira", "adarankgrad", "apollo", "adamw", "flora")  # saved and resumed through fullrank.train.fsdp
# (case, preset, options): every method the issue names, plus the code paths that differ (per-matrix φ,
# stacked buckets, the warm refresh, moment re-projection with a fixed rank).
CASES = [
    ("fira", "fira", {}),
    ("galore", "galore", {}),
    ("apollo", "apollo", {}),
    ("adarankgrad", "adarankgrad", {}),
    ("fira_matrix", "fira_matrix", {}),
    ("fira_stacked", "fira", {"bucket_cap_mb": 64}),
    ("fira_warm", "fira", {"svd": "warm"}),
    ("galore_reproject", "galore", {"on_switch": "reproject", "bucket_cap_mb": 64}),
    # the other presets
    *[(name, name, {}) for name in ("fira_no_scaling", "fira_no_limiter", "fira_grad_clipping", "fira_gradient_shrink",
                                    "fira_tensor_scaling", "fira_only_scaling", "fira_adaptive", "apollo_mini", "flora",
                                    "sgd")],
]


# fp32 sharded against unsharded: the reductions run in another order, so every result differs by
# rounding; a discontinuous decision taken on a rounded value (the limiter's ‖S_t‖/‖S_{t−1}‖ > γ, an
# adaptive rank's energy threshold) can then flip, and the update with it. The fp32 check therefore
# runs without those switches (no adaptive rank, no limiter), on one case of each fp32 code path: the
# per-matrix and the stacked bucket, the exact and the warm SVD, left and right projections, the random
# projection and Flora; every preset, switches included, is compared in fp64 (``cases``).
FLOAT32_CASES = ("fira", "fira_stacked", "fira_warm", "galore", "apollo", "flora")
# The layer-wise mode steps a SubspaceAdamW; Flora and SGD are optimizers of their own, refused by it on
# one process as on shards.
LAYERWISE_EXCLUDED = ("flora", "sgd")
FLOAT32_OVERRIDES = {name: {"limiter": "none"} for name in ("fira", "apollo")}  # the FLOAT32_CASES with a limiter


def tiny_llama(seed: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=3,
                         num_key_value_heads=3, num_hidden_layers=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).to(dtype)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(count)]


def optimizer(model, method: str, options: dict, stepped_in_backward: bool = False):
    """``method`` over the model's groups; ``stepped_in_backward``: wrapped by ``fullrank.layerwise``."""
    groups = param_groups(model, rank=RANK, update_proj_gap=GAP)
    build = lambda g: make_optimizer(method, g, lr=1e-2, weight_decay=0.01, **options)  # noqa: E731
    return layerwise(model, build, groups) if stepped_in_backward else build(groups)


def worst_relative(model, reference) -> float:
    """max over parameters of ‖W − W_ref‖/‖W_ref‖, the weights of ``models`` made whole."""
    return max(float((p.full_tensor().detach() - q.full_tensor().detach()).norm() / q.full_tensor().norm())
               for p, q in zip(model.parameters(), reference.parameters()))


def train_step(model, opt, x: torch.Tensor) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def local_batch(x: torch.Tensor) -> torch.Tensor:
    return x.chunk(dist.get_world_size())[dist.get_rank()]


def state_bytes(opt) -> dict:
    moments = other = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                size = value.numel() * value.element_size()
                if key in ("exp_avg", "exp_avg_sq"):
                    moments += size
                else:
                    other += size
    return {"moments": moments, "other": other, "total": moments + other}


def compare(method: str, options: dict, split: bool = False, dtype: torch.dtype = torch.float32,
            with_layerwise: bool = False) -> dict:
    """``method`` on the sharded model beside the unsharded one. Every rank runs the whole batch (the
    gradient FSDP averages is then the reference's, so only the optimizer can differ), or with
    ``split`` its half (data parallel: the halves' gradients are summed in another order).
    ``with_layerwise``: a third model, sharded and stepped layer-wise in FSDP2's backward, beside both."""
    reference, model = tiny_llama(0, dtype), shard(tiny_llama(0, dtype))
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    opt_ref, opt = optimizer(reference, method, options), optimizer(model, method, options)
    stepped = shard(tiny_llama(0, dtype)) if with_layerwise else None
    opt_stepped = optimizer(stepped, method, options, stepped_in_backward=True) if with_layerwise else None
    losses_ref, losses = [], []
    for x in batches(STEPS):
        losses_ref.append(train_step(reference, opt_ref, x))
        losses.append(train_step(model, opt, local_batch(x) if split else x))
        if with_layerwise:
            train_step(stepped, opt_stepped, local_batch(x) if split else x)
    worst_weight = worst_update = 0.0
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        whole = p.full_tensor().detach()
        worst_weight = max(worst_weight, float((whole - p_ref).norm() / p_ref.norm()))
        moved = p_ref.detach() - start[name]
        if moved.norm() > 0:
            worst_update = max(worst_update, float((whole - start[name] - moved).norm() / moved.norm()))
    ranks = getattr(opt, "current_ranks", dict)()
    ranks_equal = ranks == getattr(opt_ref, "current_ranks", dict)()
    result = {"weight_rel": worst_weight, "update_rel": worst_update, "ranks_equal": ranks_equal,
              "ranks": sorted(set(ranks.values())), "state": state_bytes(opt),
              "state_reference": state_bytes(opt_ref), "losses_ref": losses_ref,
              "loss_rank_mean": sum(losses) / len(losses)}
    if with_layerwise:
        result["layerwise"] = {
            "vs_sharded": worst_relative(stepped, model),
            "vs_unsharded": max(float((p.full_tensor() - q).norm() / q.norm())
                                for p, q in zip(stepped.parameters(), reference.parameters())),
            "ranks_equal": opt_stepped.current_ranks() == ranks, "skipped": opt_stepped.optimizer.skipped_steps,
            "grads_freed": all(p.grad is None for p in stepped.parameters())}
    return result


def mixed_precision() -> dict:
    """``fullrank.train.fsdp.shard_model`` with the bf16 policy (what a GPU run gets) beside fp32
    unsharded Fira on the same batches: the dtypes of weights, gradients and state, and how far
    the losses and weights drift."""
    from fullrank.train.fsdp import shard_model

    reference, model = tiny_llama(0), shard_model(tiny_llama(0), torch.device("cpu"), bf16=True)
    opt_ref, opt = optimizer(reference, "fira", {}), optimizer(model, "fira", {})
    loss_rel, dtypes = 0.0, set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, inputs, output: dtypes.add(("compute", str(module.weight.dtype))))
    for x in batches(STEPS):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        dtypes |= {("grad", str(p.grad.dtype)) for p in model.parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        expected = train_step(reference, opt_ref, x)
        loss_rel = max(loss_rel, abs(float(loss) - expected) / expected)
    dtypes |= {("weight", str(p.dtype)) for p in model.parameters()}
    dtypes |= {("state", str(v.dtype)) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    weight_rel = max(float((p.full_tensor() - q).norm() / q.norm())
                     for p, q in zip(model.parameters(), reference.parameters()))
    return {"loss_rel": loss_rel, "weight_rel": weight_rel, "dtypes": sorted(dtypes)}


def nonfinite() -> dict:
    """A NaN in rank 1's part of one gradient: every rank skips (or raises) the same step."""
    out = {}
    for policy in ("skip", "raise"):
        model = shard(tiny_llama(0))
        opt = optimizer(model, "fira", {"nonfinite": policy})
        x = batches(2)
        train_step(model, opt, local_batch(x[0]))
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        model(input_ids=local_batch(x[1]), labels=local_batch(x[1])).loss.backward()
        weight = model.model.layers[0].mlp.down_proj.weight
        if dist.get_rank() == 1:
            weight.grad._local_tensor[0, 0] = float("nan")
        try:
            opt.step()
            raised = None
        except Exception as error:  # noqa: BLE001 (the test reads the type and message)
            raised = f"{type(error).__name__}: {error}"
        unchanged = all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
        out[policy] = {"raised": raised, "unchanged": unchanged, "skipped": opt.skipped_steps}
    return out


def errors() -> dict:
    """What a sharded model refuses, with the message."""
    from fullrank.optim.units.rules import Rule, register_rule, Contribution

    class Unaware(Rule):
        name = "test_unaware"

        def contribution(self, bucket, options):
            return Contribution(options["scale"])

    register_rule(Unaware())
    out = {}
    x = batches(1)[0]
    for case, build in (
        ("proj_type_full", lambda m: make_optimizer("galore", param_groups(m, rank=RANK, proj_type="full"))),
        ("unaware_rule", lambda m: optimizer(m, "galore", {"residual": "test_unaware"})),
    ):
        model = shard(tiny_llama(0))
        opt = build(model)
        try:
            train_step(model, opt, local_batch(x))
            out[case] = None
        except ValueError as error:
            out[case] = str(error)
    model = shard(tiny_llama(0))
    try:  # the hook fires once per reduce-scatter: accumulation is FSDP2's set_requires_gradient_sync
        layerwise(model, lambda groups: make_optimizer("fira", groups), param_groups(model, rank=RANK),
                  accumulation_steps=2)
        out["layerwise_accumulation"] = None
    except (ValueError, TypeError) as error:
        out["layerwise_accumulation"] = str(error)
    return out


def recorded_steps(model, opt) -> tuple[CommLog, CommLog]:
    """The collectives of one steady step (the second) and of one refresh step (step GAP + 1)."""
    data = batches(GAP + 1)
    train_step(model, opt, local_batch(data[0]))  # the first refresh
    with CommLog().recording() as steady:
        train_step(model, opt, local_batch(data[1]))
    for x in data[2:GAP]:
        train_step(model, opt, local_batch(x))
    with CommLog().recording() as refresh:
        train_step(model, opt, local_batch(data[GAP]))
    return steady, refresh


def communication() -> dict:
    """Elements moved by one steady Fira step (no refresh) and by one refresh step, and what the
    table of sharding.py predicts for this model."""
    model = shard(tiny_llama(0))
    opt = optimizer(model, "fira", {})
    steady, refresh = recorded_steps(model, opt)
    world = dist.get_world_size()
    chunk = math.ceil(INTERMEDIATE / world)
    left = [p for g in opt.param_groups if g.get("rank") for p in g["params"] if p.shape[0] < p.shape[1]]
    right = [p for g in opt.param_groups if g.get("rank") for p in g["params"] if p.shape[0] >= p.shape[1]]
    rows = lambda m: math.ceil(m / world)  # noqa: E731
    predicted_steady = {"reduce_scatter": len(left) * (RANK + 1) * world * chunk,
                        "all_gather": len(left) * (RANK + 1) * world * chunk}
    predicted_refresh = {"gather": sum(rows(p.shape[0]) * p.shape[1] for p in left + right),
                         "broadcast": sum(p.shape[0] * RANK for p in left) + sum(RANK * p.shape[1] for p in right)}
    return {"steady": steady.elements, "steady_calls": steady.calls, "refresh": refresh.elements,
            "predicted_steady": predicted_steady, "predicted_refresh": predicted_refresh}


def save_and_resume(out: Path, method: str = "fira") -> dict:
    """k steps, a checkpoint (``fullrank.train.fsdp.save``: DCP), then the next steps from a fresh
    model loaded from it (``fsdp.load``)."""
    from fullrank.train import fsdp

    data = batches(8, seed=2)
    model = shard(tiny_llama(0))
    opt = optimizer(model, method, {})
    for x in data[:4]:
        train_step(model, opt, local_batch(x))
    checkpoint = out / f"ckpt_{method}"
    fsdp.save(checkpoint, model, opt, {"step": 4}, dist.get_rank() == 0)
    continued = [train_step(model, opt, local_batch(x)) for x in data[4:]]
    fresh = shard(tiny_llama(5))  # other weights: everything must come from the checkpoint
    opt2 = optimizer(fresh, method, {})
    fsdp.load(checkpoint, fresh, opt2)
    resumed = [train_step(fresh, opt2, local_batch(x)) for x in data[4:]]
    global_losses = []
    for value in continued:  # the loss of the whole batch: the mean over the ranks' halves
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        global_losses.append(float(t) / dist.get_world_size())
    return {"continued": continued, "resumed": resumed, "global_continued": global_losses}


def reshard(out: Path) -> dict:
    """The 2-rank checkpoints resumed on this world size (1)."""
    from fullrank.train import fsdp

    data = batches(8, seed=2)
    result = {}
    for method in RESUMED:
        model = shard(tiny_llama(5))
        opt = optimizer(model, method, {})
        fsdp.load(out / f"ckpt_{method}", model, opt)
        result[method] = [train_step(model, opt, local_batch(x)) for x in data[4:]]
    return result


def run_phase(rank: int, world: int, init_file: str, out_dir: str, phase: str, body) -> None:
    """Start the gloo group (a collective that does not match fails within two minutes instead of
    hanging), run ``body(out_dir)`` and write every rank's result, with the world size, to
    ``<out_dir>/<phase>.json``."""
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = {**body(Path(out_dir)), "world": world}
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            (Path(out_dir) / f"{phase}.json").write_text(json.dumps(gathered))
    finally:
        cleanup(synchronize=True)  # free the runs' FSDP2 state and pending gloo work before the group goes


def main(rank: int, world: int, init_file: str, out_dir: str, phase: str) -> None:
    run_phase(rank, world, init_file, out_dir, phase, sharded if phase == "sharded" else reshard)


def sharded(out: Path) -> dict:
    """Phase "sharded" (2 ranks): equivalence (the layer-wise mode too), state size, communication,
    save and resume."""
    return {"cases": {name: compare(method, options, dtype=torch.float64,
                                    with_layerwise=method not in LAYERWISE_EXCLUDED)
                      for name, method, options in CASES},
            "float32": {name: compare(method, {**options, **FLOAT32_OVERRIDES.get(method, {})})
                        for name, method, options in CASES if name in FLOAT32_CASES},
            "split": {name: compare(name, {}, split=True) for name in ("adamw", "fira", "galore")},
            "float64": {name: compare(name, {}, split=True, dtype=torch.float64)
                        for name in ("fira", "galore", "adarankgrad")},
            "nonfinite": nonfinite(), "errors": errors(), "mixed_precision": mixed_precision(),
            "communication": communication(),
            "resume": {method: save_and_resume(out, method) for method in RESUMED}}


if __name__ == "__main__":  # by hand: python tests/fsdp_worker.py OUT_DIR
    import tempfile

    import torch.multiprocessing as mp
    target = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    target.mkdir(parents=True, exist_ok=True)
    for phase, world in (("sharded", 2), ("reshard", 1)):
        init = target / f"init_{phase}"
        init.unlink(missing_ok=True)
        mp.spawn(main, args=(world, str(init), str(target), phase), nprocs=world)
    print(json.dumps(json.loads((target / "sharded.json").read_text())[0], indent=1)[:4000])
    print((target / "reshard.json").read_text()[:1000])
