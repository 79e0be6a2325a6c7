"""Worker of tests/test_fsdp_layerwise.py: the layer-wise mode on FSDP2 shards, 8-bit moments and
stochastic rounding on shards (gloo, CPU). Rank 0 writes what every rank measured as JSON.

Run by ``torch.multiprocessing.spawn``: ``main(rank, world, init_file, out_dir, phase)``; phase
"sharded" (2 ranks) or "reshard" (1 rank: the 2-rank checkpoints on another world size). The
layer-wise mode's equality with the ordinary sharded step for every preset is in ``fsdp_worker.py``
(``compare(..., with_layerwise=True)``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import (  # noqa: E402
    batches, local_batch, optimizer, recorded_steps, run_phase, shard, tiny_llama, train_step, worst_relative,
)

from fullrank.optim import layerwise, make_optimizer, param_groups  # noqa: E402
from fullrank.optim.base import shards  # noqa: E402
from fullrank.optim.base.shards import DTensor  # noqa: E402
from fullrank.optim.units.moments import get_store  # noqa: E402
from fullrank.optim.units.projection import projection_side  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# layer-wise on shards, saved and resumed through fullrank.train.fsdp; AdaRankGrad's threshold is crossed in the
# first steps, so that the checkpoint holds matrices whose trigger asks the next step for a refresh
RESUMED = {"fira": {}, "adarankgrad": {"refresh_threshold": 0.9}, "apollo": {}}
EIGHT_BIT = ("fira", "adarankgrad")  # of test_low_precision's seed-spread test: one with fixed, one with adaptive ranks
SEEDS = 3
POISONED = "model.layers.0.mlp.down_proj.weight"


# ---------------------------------------------------------------------------- layer-wise on shards
def nonfinite() -> dict:
    """A NaN in rank 1's shard of one gradient, put there by a hook that fires before the layer-wise
    one: on every rank that parameter (weight and state) stays as it was, the others are updated,
    and ``step()`` skips (counts it) or raises naming it."""
    out = {}
    for policy in ("skip", "raise"):
        model = shard(tiny_llama(0))
        weight = model.get_parameter(POISONED)
        poisoned = [False]

        def poison(param, poisoned=poisoned):
            if poisoned[0] and dist.get_rank() == 1:
                param.grad._local_tensor[0, 0] = float("nan")

        weight.register_post_accumulate_grad_hook(poison)  # (registered first: fires first)
        opt = optimizer(model, "fira", {"nonfinite": policy}, stepped_in_backward=True)
        x = batches(3)
        for batch in x[:2]:
            train_step(model, opt, local_batch(batch))
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[weight].items()}
        poisoned[0] = True
        model(input_ids=local_batch(x[2]), labels=local_batch(x[2])).loss.backward()
        try:
            opt.step()
            raised = None
        except Exception as error:  # noqa: BLE001 (the test reads the type and message)
            raised = f"{type(error).__name__}: {error}"
        after = {n: p.full_tensor() for n, p in model.named_parameters()}
        out[policy] = {
            "raised": raised, "skipped": opt.optimizer.skipped_steps,
            "poisoned_unchanged": torch.equal(after[POISONED], before[POISONED]),
            "state_unchanged": all(torch.equal(v, opt.state[weight][k]) if torch.is_tensor(v) else v == opt.state[weight][k]
                                   for k, v in state.items()),
            "others_changed": all(not torch.equal(after[n], before[n]) for n in after if n != POISONED)}
    return out


def accumulation() -> dict:
    """Two micro-batches per step, FSDP2's way: no gradient sync (no reduce-scatter, no hook) on the
    first. Layer-wise (``accumulation_steps=1``) against the ordinary sharded step, fp64; the hooks
    fire once per step."""
    models = [shard(tiny_llama(0, torch.float64)) for _ in range(2)]
    ordinary, stepped = optimizer(models[0], "fira", {}), optimizer(models[1], "fira", {}, stepped_in_backward=True)
    hooks = []
    models[1].model.norm.weight.register_post_accumulate_grad_hook(lambda p: hooks.append(1))
    data = batches(8)
    for step in range(4):
        for model, opt in zip(models, (ordinary, stepped)):
            for micro in range(2):
                model.set_requires_gradient_sync(micro == 1)
                x = data[2 * step + micro]
                (model(input_ids=x, labels=x).loss / 2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"weight_rel": worst_relative(models[1], models[0]), "hooks": len(hooks)}


class TwoPaths(nn.Module):
    """Two projected matrices and a head; ``forward(x, use_b=False)`` leaves ``b`` out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 24, bias=False), nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 4)

    def forward(self, x, use_b: bool = True):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(h)) if use_b else h)


def frozen_and_unused() -> dict:
    """(1) A frozen matrix inside an FSDP2 unit: no gradient, no hook, no state; (2) a matrix used on
    rank 0 only, with ``set_reduce_scatter_unused_params(True)`` (without it FSDP2's own
    reduce-scatters would not match): every rank fires its hook, rank 1's gradient share is zero.
    Both layer-wise against the ordinary sharded step (fp64), hook calls counted per rank."""
    out = {}
    frozen = "model.layers.0.mlp.up_proj.weight"
    models = []
    for _ in range(2):
        model = tiny_llama(0, torch.float64)
        model.get_parameter(frozen).requires_grad_(False)
        models.append(shard(model))
    start = models[1].get_parameter(frozen).full_tensor().clone()
    opts = optimizer(models[0], "fira", {}), optimizer(models[1], "fira", {}, stepped_in_backward=True)
    for x in batches(4):
        for model, opt in zip(models, opts):
            train_step(model, opt, x)
    out["frozen"] = {"weight_rel": worst_relative(models[1], models[0]),
                     "unchanged": torch.equal(models[1].get_parameter(frozen).full_tensor(), start),
                     "no_state": not opts[1].state.get(models[1].get_parameter(frozen))}
    models = []
    for _ in range(2):
        model = TwoPaths().double()
        fully_shard(model)
        model.set_reduce_scatter_unused_params(True)
        models.append(model)
    calls = []
    models[1].b.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    groups = lambda m: [{"params": [m.a.weight, m.b.weight], "rank": 4, "update_proj_gap": 2},  # noqa: E731
                        {"params": list(m.head.parameters())}]
    build = lambda g: make_optimizer("fira", g, lr=1e-2, weight_decay=0.01)  # noqa: E731
    opts = build(groups(models[0])), layerwise(models[1], build, groups(models[1]))
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(8, 16, generator=generator, dtype=torch.float64)
        for model, opt in zip(models, opts):
            model(x, use_b=dist.get_rank() == 0).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out["unused_on_one_rank"] = {"weight_rel": worst_relative(models[1], models[0]), "hooks": len(calls)}
    return out


def communication() -> dict:
    """Elements (and calls) of each kind of collective in one steady Fira step and one refresh step,
    layer-wise and ordinary, on the same model and batches."""
    out = {}
    for label, in_backward in (("ordinary", False), ("layerwise", True)):
        model = shard(tiny_llama(0))
        steady, refresh = recorded_steps(model, optimizer(model, "fira", {}, stepped_in_backward=in_backward))
        out[label] = {"steady": steady.elements, "steady_calls": steady.calls, "refresh": refresh.elements,
                      "refresh_calls": refresh.calls}
    out["parameters"] = sum(1 for _ in model.parameters())
    return out


def save_and_resume(out: Path, method: str) -> dict:
    """Layer-wise on shards: k steps, a DCP checkpoint (``fullrank.train.fsdp.save``), then the next
    steps from a fresh model loaded from it (``fsdp.load``)."""
    from fullrank.train import fsdp

    data = batches(8, seed=2)
    model = shard(tiny_llama(0))
    opt = optimizer(model, method, RESUMED[method], stepped_in_backward=True)
    for x in data[:4]:
        train_step(model, opt, local_batch(x))
    flagged = len(opt._flagged)
    checkpoint = out / f"ckpt_layerwise_{method}"
    fsdp.save(checkpoint, model, opt, {"step": 4}, dist.get_rank() == 0)
    continued = [train_step(model, opt, local_batch(x)) for x in data[4:]]
    fresh = shard(tiny_llama(5))
    opt2 = optimizer(fresh, method, RESUMED[method], stepped_in_backward=True)
    fsdp.load(checkpoint, fresh, opt2)
    resumed = [train_step(fresh, opt2, local_batch(x)) for x in data[4:]]
    return {"continued": continued, "resumed": resumed, "global_continued": global_mean(continued), "flagged": flagged,
            "weights_equal": all(torch.equal(p.full_tensor(), q.full_tensor())
                                 for p, q in zip(model.parameters(), fresh.parameters()))}


def global_mean(values: list[float]) -> list[float]:
    """The whole batch's losses: the mean over the ranks' halves."""
    out = []
    for value in values:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        out.append(float(t) / dist.get_world_size())
    return out


# ---------------------------------------------------------------------------- 8-bit moments on shards
def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, sharded: bool = True) -> nn.Module:
    """test_low_precision's model: moments of 16×256 whole (quantized), 16×128 per rank."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 192, bias=False), nn.Tanh(), nn.Linear(192, 256, bias=False),
                          nn.Linear(256, 40)).to(dtype)
    if sharded:
        fully_shard(model)
    return model


def mlp_groups(model: nn.Module, rank: int = 16) -> list[dict]:
    return [{"params": [model[0].weight, model[2].weight], "rank": rank, "update_proj_gap": 3},
            {"params": list(model[3].parameters())}]


def mlp_data(steps: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 256, generator=generator).to(dtype) for _ in range(steps)]


def mlp_train(model, opt, data) -> list[float]:
    losses = []
    for x in data:
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def moment_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if k.startswith("exp_avg") and torch.is_tensor(v))


def eight_bit_spread() -> dict:
    """Sharded 8-bit against sharded 32-bit, by test_low_precision's criterion: per method, the final
    loss of 3 seeds (model and data) in both, and the moments' bytes on this rank."""
    out = {}
    for method in EIGHT_BIT:
        finals, deviations = [], []
        for seed in range(SEEDS):
            runs = {}
            for states in ("32bit", "8bit"):
                model = mlp(seed)
                opt = make_optimizer(method, mlp_groups(model), lr=1e-2, states=states)
                runs[states] = (mlp_train(model, opt, mlp_data(12, seed + 1)), model, opt)
            finals.append(runs["32bit"][0][-1])
            deviations.append(abs(runs["8bit"][0][-1] - runs["32bit"][0][-1]))
        opt8, opt32 = runs["8bit"][2], runs["32bit"][2]
        out[method] = {"finals": finals, "deviations": deviations, "bytes_8bit": moment_bytes(opt8),
                       "bytes_32bit": moment_bytes(opt32), "weight_rel": worst_relative(runs["8bit"][1], runs["32bit"][1]),
                       "quantized": sorted({str(s["exp_avg"].dtype) for s in opt8.state.values()})}
    return out


def whole_moments(opt, model) -> dict:
    """Every 8-bit moment dequantized and made whole (on every rank), by parameter name and key."""
    store, out = get_store("8bit"), {}
    for name, param in model.named_parameters():
        state = opt.state.get(param, {})
        if "exp_avg_absmax" not in state:
            continue
        group = opt.locate(param)[0]
        side = projection_side(group["proj_type"], tuple(param.shape)) if group.get("rank") else None
        dim, size = shards.state_split(shards.row_shard(param, name), side)
        (m,), (v,) = store.load([state])
        for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
            shape = list(value.shape)
            shape[dim] = size
            out[f"{name}/{key}"] = DTensor.from_local(value, param.device_mesh, [shards.Shard(dim)], run_check=False,
                                                      shape=torch.Size(shape),
                                                      stride=torch.empty(shape, device="meta").stride()).full_tensor()
    return out


def eight_bit_resume(out: Path) -> dict:
    """Sharded 8-bit Fira (plain 8-bit group too): a DCP checkpoint after 4 steps resumed on this world
    size (exact), its moments kept whole for the other world size's check."""
    from fullrank.train import fsdp

    data = mlp_data(7, seed=4)
    model = mlp(0)
    opt = make_optimizer("fira", mlp_groups(model), lr=1e-2, states="8bit")
    mlp_train(model, opt, data[:4])
    checkpoint = out / "ckpt_8bit"
    fsdp.save(checkpoint, model, opt, {"step": 4}, dist.get_rank() == 0)
    moments = whole_moments(opt, model)
    if dist.get_rank() == 0:
        torch.save(moments, out / "moments_8bit.pt")
    continued = mlp_train(model, opt, data[4:])
    fresh = mlp(5)
    opt2 = make_optimizer("fira", mlp_groups(fresh), lr=1e-2, states="8bit")
    fsdp.load(checkpoint, fresh, opt2)
    resumed = mlp_train(fresh, opt2, data[4:])
    return {"continued": continued, "resumed": resumed,
            "weights_equal": all(torch.equal(p.full_tensor(), q.full_tensor())
                                 for p, q in zip(model.parameters(), fresh.parameters())),
            "absmax_shapes": [tuple(s["exp_avg_absmax"].shape) for s in opt2.state.values() if "exp_avg_absmax" in s]}


# ---------------------------------------------------------------------------- stochastic rounding on shards
class Ones(nn.Module):
    """A 64×128 matrix and a vector of 20 000, at 1.0."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.matrix = nn.Parameter(torch.ones(64, 128, dtype=dtype))
        self.vector = nn.Parameter(torch.ones(20_000, dtype=dtype))


def constant_gradients(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = DTensor.from_local(torch.ones_like(p._local_tensor), p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())


def rounding_unbiased() -> dict:
    """Weights at 1.0, constant gradients, lr 1e-4 (each step moves a weight by under a tenth of a bf16
    ulp): the mean moves as the fp32 run's with stochastic rounding, not at all to nearest; after
    one step the two ranks' halves of the matrix (equal before rounding) were rounded differently."""
    out = {}
    for label, dtype, rounding in (("fp32", torch.float32, False), ("nearest", torch.bfloat16, False),
                                   ("stochastic", torch.bfloat16, True)):
        module = Ones(dtype)
        fully_shard(module)
        groups = [{"params": [module.matrix], "rank": 4}, {"params": [module.vector]}]
        opt = make_optimizer("galore", groups, lr=1e-4, stochastic_rounding=rounding, scale=1.0)
        halves = None
        for step in range(20):
            constant_gradients(module)
            opt.step()
            if step == 0:
                halves = [None] * dist.get_world_size()
                dist.all_gather_object(halves, module.matrix._local_tensor.float().tolist())
        out[label] = {"matrix_mean": module.matrix.full_tensor().double().mean().item(),
                      "vector_mean": module.vector.full_tensor().double().mean().item(),
                      "halves_differ": halves[0] != halves[1]}
    return out


def bf16_run(out: Path, name: str, stepped_in_backward: bool, states: str = "32bit") -> dict:
    """bf16 weights, stochastic rounding (the LLaMA-7B recipe's; with ``states`` and the layer-wise
    mode): 6 steps twice from the start (deterministic), and steps 4–6 from a DCP checkpoint."""
    from fullrank.train import fsdp

    def build(model):
        make = lambda g: make_optimizer("fira", g, lr=1e-3, stochastic_rounding=True, seed=3, states=states)  # noqa: E731
        return layerwise(model, make, mlp_groups(model)) if stepped_in_backward else make(mlp_groups(model))

    data = mlp_data(6, seed=6, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        model = mlp(0, torch.bfloat16)
        runs.append(mlp_train(model, build(model), data))
    model = mlp(0, torch.bfloat16)
    opt = build(model)
    first = mlp_train(model, opt, data[:3])
    checkpoint = out / f"ckpt_{name}"
    fsdp.save(checkpoint, model, opt, {"step": 3}, dist.get_rank() == 0)
    fresh = mlp(5, torch.bfloat16)
    opt2 = build(fresh)
    fsdp.load(checkpoint, fresh, opt2)
    return {"runs": runs, "resumed": first + mlp_train(fresh, opt2, data[3:]),
            "dtypes": sorted({str(v.dtype) for s in opt2.state.values() for v in s.values() if torch.is_tensor(v)})}


def refusals() -> dict:
    """What the layer-wise mode refuses on a sharded model, with the message."""
    out = {}
    model = shard(tiny_llama(0))
    build = lambda g: make_optimizer("fira", g)  # noqa: E731
    for case, call in (("accumulation", lambda: layerwise(model, build, param_groups(model, rank=8), accumulation_steps=2)),
                       ("capturable", lambda: layerwise(model, lambda g: make_optimizer("fira", g, capturable=True,
                                                                                        nonfinite="skip"),
                                                        param_groups(model, rank=8)))):
        try:
            call()
            out[case] = None
        except (ValueError, TypeError) as error:
            out[case] = str(error)
    return out


# ---------------------------------------------------------------------------- phases
def sharded(out: Path) -> dict:
    return {"nonfinite": nonfinite(), "accumulation": accumulation(), "frozen_and_unused": frozen_and_unused(),
            "communication": communication(),
            "resume": {method: save_and_resume(out, method) for method in RESUMED},
            "eight_bit": eight_bit_spread(), "eight_bit_resume": eight_bit_resume(out),
            "rounding": rounding_unbiased(), "bf16_sr": bf16_run(out, "bf16_sr", False),
            "bf16_sr_8bit_layerwise": bf16_run(out, "bf16_sr_8bit_layerwise", True, "8bit"),
            "refusals": refusals()}


def reshard(out: Path) -> dict:
    """The 2-rank checkpoints on this world size: the layer-wise runs continued, the 8-bit moments
    requantized (against the saved ones, made whole) and the 8-bit run continued."""
    from fullrank.train import fsdp

    result = {"resume": {}}
    data = batches(8, seed=2)
    for method in RESUMED:
        model = shard(tiny_llama(5))
        opt = optimizer(model, method, RESUMED[method], stepped_in_backward=True)
        fsdp.load(out / f"ckpt_layerwise_{method}", model, opt)
        result["resume"][method] = [train_step(model, opt, local_batch(x)) for x in data[4:]]
    model = mlp(5)
    opt = make_optimizer("fira", mlp_groups(model), lr=1e-2, states="8bit")
    fsdp.load(out / "ckpt_8bit", model, opt)
    saved = torch.load(out / "moments_8bit.pt")
    loaded = whole_moments(opt, model)
    result["eight_bit"] = {
        "keys_equal": sorted(saved) == sorted(loaded),
        "worst": max(float((loaded[k] - saved[k]).abs().max() / saved[k].abs().max()) for k in saved),
        "uint8": all(s["exp_avg"].dtype == torch.uint8 for s in opt.state.values() if "exp_avg_absmax" in s),
        "continued": mlp_train(model, opt, mlp_data(7, seed=4)[4:])}
    return result


def main(rank: int, world: int, init_file: str, out_dir: str, phase: str) -> None:
    run_phase(rank, world, init_file, out_dir, phase, sharded if phase == "sharded" else reshard)
