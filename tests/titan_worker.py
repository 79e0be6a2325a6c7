"""Worker of tests/test_titan.py: torchtitan's Llama 3 debug model, sharded by torchtitan's own FSDP2
function over gloo, stepped by fullrank.titan's container, beside fullrank's own FSDP2 path on the same
model; and the container saved and resumed through torchtitan's checkpoint manager (DCP). Rank 0 writes
what it measured as JSON.

Run by ``torch.multiprocessing.spawn``: ``main(rank, world, init_file, out_dir)``.

The debug model is torchtitan's ``debugmodel`` flavour (d_model 256, vocabulary 2048, fused QKV) in
float64 with two changes: its first ``LAYERS`` of 6 blocks (the blocks are alike; fewer keep the test
in seconds), and torchtitan's ``ScaledDotProductAttention`` (causal) in them, the backend its
graph-trainer tests use, since FlexAttention has no backward on a CPU.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

import fullrank
from fullrank.titan import CheckpointManager, subspace_optimizer
from fullrank.train.distributed import cleanup

VOCAB = 2048
LAYERS = 2
RANK, GAP, SCALE, LR = 16, 2, 0.25, 1e-2
STEPS = 4  # refreshes at steps 1 and 3 (T = 2)
SAVED_AT, RESUMED_STEPS = 3, 3  # the continuation refreshes at step 5
BATCH, SEQUENCE = 2, 24  # the global batch: each rank takes its half
TARGETS = ("attention", "feed_forward")  # fullrank.param_groups' substring rule for the same Linear modules
# "mixed": Fira on the linear weights, torchtitan's AdamW on the rest; Flora keeps torch-style (DTensor) state
RESUMED = ("fira", "adarankgrad", "mixed", "flora")


def debug_model(seed: int) -> torch.nn.Module:
    """torchtitan's Llama 3 debug model (``LAYERS`` blocks, causal SDPA) in float64, built as its
    Trainer builds it (under the training dtype as the default dtype), weights from ``init_weights``
    after ``manual_seed(seed)``."""
    spec = model_registry("debugmodel")
    spec.model.layers = spec.model.layers[:LAYERS]
    for layer in spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = spec.model.build()
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    finally:
        torch.set_default_dtype(previous)
    return model


def sharded_debug_model(seed: int) -> torch.nn.Module:
    """The debug model sharded by torchtitan's ``apply_fsdp_to_decoder`` (embeddings, each block,
    norm + lm_head: FSDP2 units on a 1-D mesh over every rank), computing in float64."""
    model = debug_model(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    apply_fsdp_to_decoder(model, mesh, param_dtype=torch.float64, reduce_dtype=torch.float64, pp_enabled=False)
    return model


def batch(step: int) -> torch.Tensor:
    """This rank's half of step ``step``'s global batch (the same on every run)."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQUENCE + 1), generator=generator)
    return tokens.chunk(dist.get_world_size())[dist.get_rank()]


def train_step(model, optimizer, step: int, schedulers=None) -> float:
    tokens = batch(step)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    if schedulers is not None:
        schedulers.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def whole_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).norm() / b[name].norm()) for name in b)


def container_config(method: str = "fira", rank: int = RANK, gap: int = GAP):
    if method == "flora":  # its own options: no T or α (it redraws its projection every kappa steps)
        return subspace_optimizer(method, lr=LR, rank=rank, weight_decay=0.01)
    return subspace_optimizer(method, lr=LR, rank=rank, update_proj_gap=gap, scale=SCALE, weight_decay=0.01)


def equivalence() -> dict:
    """``STEPS`` steps of the container built from torchtitan's config beside fullrank's own FSDP2 path
    (``fullrank.param_groups`` + ``fullrank.make_optimizer`` on the same sharded model and data), and
    two controls that must differ: the container at another T, and at another rank."""
    reference = sharded_debug_model(0)
    reference_optimizer = fullrank.make_optimizer(
        "fira", fullrank.param_groups(reference, rank=RANK, target_modules=TARGETS, update_proj_gap=GAP, scale=SCALE),
        lr=LR, weight_decay=0.01)
    runs = {"container": container_config(), "other_gap": container_config(gap=GAP + 1),
            "other_rank": container_config(rank=RANK // 2)}
    models = {name: sharded_debug_model(0) for name in runs}
    containers = {name: runs[name].build(model_parts=[models[name]]) for name in runs}
    losses = {name: [] for name in ["reference", *runs]}
    for step in range(1, STEPS + 1):
        losses["reference"].append(train_step(reference, reference_optimizer, step))
        for name in runs:
            losses[name].append(train_step(models[name], containers[name], step))
    expected = whole_weights(reference)
    out = {"losses": losses}
    for name in runs:
        weights = whole_weights(models[name])
        out[name] = {"weight_rel": relative_difference(weights, expected),
                     "bitwise": all(torch.equal(weights[n], expected[n]) for n in expected)}
    (optimizer,) = containers["container"].optimizers
    out["optimizer"] = type(optimizer).__name__
    out["groups"] = [{"params": len(g["params"]), "rank": g.get("rank"), "update_proj_gap": g["update_proj_gap"],
                      "scale": g["scale"], "gamma": g["gamma"]} for g in optimizer.param_groups]
    out["reference_groups"] = [[len(g["params"]), g.get("rank")] for g in reference_optimizer.param_groups]
    out["refreshed_ranks"] = sorted(set(optimizer.current_ranks().values()))
    return out


@dataclass
class TrainState(Stateful):
    """The trainer's own state, as torchtitan's Trainer checkpoints it."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])


def resumable_run(method: str, seed: int, folder: Path):
    model = sharded_debug_model(seed)
    if method == "mixed":
        config = container_config()
        config.param_groups[1] = ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                                                  optimizer_kwargs={"lr": LR, "weight_decay": 0.01})
        config.implementation = "for-loop"
    else:
        config = container_config(method)
    container = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5).build(
        optimizers=container, training_steps=SAVED_AT + RESUMED_STEPS)
    state = TrainState()
    checkpointer = CheckpointManager.Config(enable=True, folder=f"checkpoint_{method}", interval=SAVED_AT,
                                            keep_latest_k=0).build(
        dataloader=None, model_parts=[model], optimizers=container, lr_schedulers=schedulers,
        states={"train_state": state}, sd_adapter=None, base_folder=str(folder))
    return model, container, schedulers, state, checkpointer


def save_and_resume(method: str, folder: Path) -> dict:
    """``SAVED_AT`` steps, a checkpoint through torchtitan's manager, ``RESUMED_STEPS`` more; then a
    fresh model (other weights), container and schedulers loaded from the checkpoint run the same
    ``RESUMED_STEPS``: losses and weights must be the uninterrupted run's."""
    model, container, schedulers, state, checkpointer = resumable_run(method, 0, folder)
    for step in range(1, SAVED_AT + 1):
        train_step(model, container, step, schedulers)
        state.step = step
    assert checkpointer.save(curr_step=SAVED_AT)
    continued = [train_step(model, container, step, schedulers)
                 for step in range(SAVED_AT + 1, SAVED_AT + RESUMED_STEPS + 1)]
    expected = whole_weights(model)
    checkpointer.close()

    fresh, fresh_container, fresh_schedulers, fresh_state, fresh_checkpointer = resumable_run(method, 7, folder)
    assert fresh_checkpointer.load(step=SAVED_AT)
    loaded_step = fresh_state.step
    resumed = [train_step(fresh, fresh_container, step, fresh_schedulers)
               for step in range(SAVED_AT + 1, SAVED_AT + RESUMED_STEPS + 1)]
    weights = whole_weights(fresh)
    fresh_checkpointer.close()
    ranks = [opt.current_ranks() for opt in fresh_container.optimizers if hasattr(opt, "current_ranks")]
    return {"continued": continued, "resumed": resumed, "loaded_step": loaded_step,
            "weight_rel": relative_difference(weights, expected),
            "bitwise": all(torch.equal(weights[n], expected[n]) for n in expected),
            "optimizers": [type(o).__name__ for o in fresh_container.optimizers],
            "ranks": sorted({r for rs in ranks for r in rs.values()})}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out_dir)
    try:
        started = time.perf_counter()
        result = {"world": world, "equivalence": equivalence()}
        seconds = {"equivalence": time.perf_counter() - started}
        result["resume"] = {}
        for method in RESUMED:
            started = time.perf_counter()
            result["resume"][method] = save_and_resume(method, out)
            seconds[f"resume_{method}"] = time.perf_counter() - started
        result["seconds"] = seconds
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            (out / "titan.json").write_text(json.dumps(gathered))
    finally:
        # what the runs left (FSDP2 state, pending gloo work) goes before the group does, as in
        # ``fullrank pretrain``: freed at interpreter exit it aborts the process (SIGABRT)
        cleanup(synchronize=True)


if __name__ == "__main__":  # by hand: python tests/titan_worker.py OUT_DIR
    import tempfile

    import torch.multiprocessing as mp
    target = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    target.mkdir(parents=True, exist_ok=True)
    init = target / "init"
    init.unlink(missing_ok=True)
    mp.spawn(main, args=(2, str(init), str(target)), nprocs=2)
    print(json.dumps(json.loads((target / "titan.json").read_text())[0], indent=1)[:6000])
