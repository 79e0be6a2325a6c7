"""fullrank optimizers under FSDP2 (``fully_shard``) on CPU: 2 gloo processes (tests/fsdp_worker.py)
against the unsharded optimizer in the same process, then the 2-rank checkpoint resumed on 1 rank."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402
from processes import spawn as spawn_processes  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def spawn(tmp: Path, phase: str, world: int) -> list[dict]:
    init = tmp / f"init_{phase}"
    spawn_processes(fsdp_worker.main, args=(world, str(init), str(tmp), phase), nprocs=world)
    return json.loads((tmp / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    sharded = spawn(tmp, "sharded", 2)
    reshard = spawn(tmp, "reshard", 1)
    return sharded, reshard[0]


@pytest.mark.parametrize("case", [name for name, _, _ in fsdp_worker.CASES])
def test_sharded_updates_equal_unsharded(runs, case):
    """Weights after 7 steps with refreshes every 3, in fp64: only rounding differs (a missing or
    doubled reduction would show at O(1), a wrong row or column split at O(update)), on both ranks."""
    for rank in runs[0]:
        result = rank["cases"][case]
        assert result["weight_rel"] <= 1e-12, result
        assert result["update_rel"] <= 1e-10, result
        assert result["ranks_equal"], result


@pytest.mark.parametrize("case", [name for name, method, _ in fsdp_worker.CASES
                                  if method not in fsdp_worker.LAYERWISE_EXCLUDED])
def test_layerwise_on_shards_equals_the_ordinary_sharded_step(runs, case):
    """The same 7 steps in fp64 with every parameter stepped in FSDP2's backward, as soon as its
    reduce-scattered shard exists (``fullrank.layerwise`` on the sharded model): equal to the
    ordinary sharded step and to one process up to rounding, the same ranks, every gradient freed."""
    for rank in runs[0]:
        result = rank["cases"][case]["layerwise"]
        assert result["vs_sharded"] <= 1e-12 and result["vs_unsharded"] <= 1e-12, result
        assert result["ranks_equal"] and result["grads_freed"] and result["skipped"] == 0, result


@pytest.mark.parametrize("case", fsdp_worker.FLOAT32_CASES)
def test_sharded_updates_equal_unsharded_in_float32(runs, case):
    """The same in fp32 on one case of each code path, without the discontinuous switches
    (``fsdp_worker.FLOAT32_OVERRIDES``): ≤ 1e-5."""
    for rank in runs[0]:
        result = rank["float32"][case]
        assert result["weight_rel"] <= 1e-5, result
        assert result["update_rel"] <= 1e-4, result
        assert result["ranks_equal"], result


@pytest.mark.parametrize("method", ["fira", "galore", "adarankgrad"])
def test_sharded_is_exact_in_float64(runs, method):
    """With split batches in fp64 nothing but rounding can differ: a missing or doubled reduction
    would show at O(1), a wrong column split at O(update)."""
    result = runs[0][0]["float64"][method]
    assert result["weight_rel"] < 1e-12 and result["update_rel"] < 1e-11, result


def test_data_parallel_batches_stay_close(runs):
    """Each rank on its half of the batch (fp32): the gradients differ from the single process by the
    order of summation only; Fira and GaLore stay within the tolerance's order (AdamW is the floor)."""
    split = runs[0][0]["split"]
    assert split["adamw"]["weight_rel"] < 5e-6
    for method in ("fira", "galore"):
        assert split[method]["weight_rel"] < 3e-5, split[method]


def test_adaptive_ranks_match_and_vary(runs):
    result = runs[0][0]["cases"]["adarankgrad"]
    assert result["ranks_equal"] and len(result["ranks"]) > 1, result


@pytest.mark.parametrize("case", ["fira", "apollo", "adarankgrad"])
def test_state_per_rank_is_about_half(runs, case):
    """The moments are split exactly between the ranks; with the replicated Q (r×n of the right
    projections) each rank holds < 60% of the single-process state."""
    ranks = [r["cases"][case] for r in runs[0]]
    reference = ranks[0]["state_reference"]
    assert sum(r["state"]["moments"] for r in ranks) == reference["moments"]
    for r in ranks:
        assert r["state"]["total"] < 0.6 * reference["total"], r["state"]


def test_communication_matches_the_documented_volume(runs):
    """sharding.py's table: a steady step moves a reduce-scatter of (r+1)·n and an all-gather of
    (r+1)·n per left-projected matrix and nothing of the right-projected ones but scalars; a
    refresh gathers each gradient once and broadcasts each new P or Q once."""
    comm = runs[0][0]["communication"]
    for kind, elements in comm["predicted_steady"].items():
        assert comm["steady"][kind] == elements, (kind, comm)
    assert "gather" not in comm["steady"] and "broadcast" not in comm["steady"]
    for kind, elements in comm["predicted_refresh"].items():
        assert comm["refresh"][kind] == elements, (kind, comm)
    # the scalars: one all-reduce of the gradient norms, the rest a few per bucket
    assert comm["steady"]["all_reduce"] < 64


@pytest.mark.parametrize("method", fsdp_worker.RESUMED)
def test_resume_from_dcp_is_exact(runs, method):
    for rank in runs[0]:
        assert rank["resume"][method]["resumed"] == rank["resume"][method]["continued"]


@pytest.mark.parametrize("method", fsdp_worker.RESUMED)
def test_resume_on_another_world_size(runs, method):
    """The 2-rank checkpoint on 1 rank: the whole-batch losses of the 2-rank continuation."""
    two, one = runs[0][0]["resume"][method]["global_continued"], runs[1][method]
    assert one == pytest.approx(two, rel=1e-5)


def test_nonfinite_gradient_on_one_rank(runs):
    """A NaN on rank 1 only: both ranks skip (or raise, naming the parameter), nothing changes."""
    for rank in runs[0]:
        result = rank["nonfinite"]
        assert result["skip"] == {"raised": None, "unchanged": True, "skipped": 1}
        assert result["raise"]["unchanged"]
        assert "NonFiniteGradientError" in result["raise"]["raised"]
        assert "model.layers.0.mlp.down_proj.weight" in result["raise"]["raised"]


def test_refusals_name_the_problem(runs):
    errors = runs[0][0]["errors"]
    assert "proj_type='full'" in errors["proj_type_full"]
    assert "shard_aware" in errors["unaware_rule"]
    assert "accumulation_steps=2" in errors["layerwise_accumulation"]
    assert "set_requires_gradient_sync(False)" in errors["layerwise_accumulation"]


def test_chunk_span_is_torch_chunk():
    from fullrank.optim.base.shards import chunk_span
    for size in (0, 1, 5, 7, 51):
        for world in (1, 2, 3, 4):
            spans = [chunk_span(size, world, k) for k in range(world)]
            pieces = torch.arange(size).chunk(world) if size else ()
            expected = [(int(p[0]), len(p)) for p in pieces]
            assert [s for s in spans if s[1]] == expected
            assert sum(s[1] for s in spans) == size
            assert all(s[1] <= math.ceil(size / world) for s in spans)


def test_bf16_policy_keeps_fp32_master_weights_and_state(runs):
    """The mixed-precision policy of a GPU run (``fsdp.shard_model(bf16=True)``), on the CPU: the
    layers compute with bf16 weights while the sharded weights, the reduced gradients and every
    optimizer state stay fp32, and the losses follow the fp32 run within bf16's precision."""
    result = runs[0][0]["mixed_precision"]
    kinds = dict(result["dtypes"])
    assert ["compute", "torch.bfloat16"] in result["dtypes"], result
    assert {kind: d for kind, d in kinds.items() if kind != "compute"} == {
        "grad": "torch.float32", "weight": "torch.float32", "state": "torch.float32"}, result
    assert len(result["dtypes"]) == 4, result  # one dtype per kind
    assert result["loss_rel"] < 1e-2, result
