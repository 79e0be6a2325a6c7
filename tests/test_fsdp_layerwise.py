"""The layer-wise mode on FSDP2 shards (each parameter stepped in backward as soon as its shard is
reduce-scattered), 8-bit moments and stochastic rounding on shards: 2 gloo processes
(tests/fsdp_layerwise_worker.py), then the 2-rank checkpoints on 1 rank. The layer-wise mode's
equality with the ordinary sharded step for every preset is tests/test_fsdp.py's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("bitsandbytes")
import fsdp_layerwise_worker as worker  # noqa: E402
from processes import spawn as spawn_processes  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def spawn(tmp: Path, phase: str, world: int) -> list[dict]:
    spawn_processes(worker.main, args=(world, str(tmp / f"init_{phase}"), str(tmp), phase), nprocs=world)
    return json.loads((tmp / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_layerwise")
    return spawn(tmp, "sharded", 2), spawn(tmp, "reshard", 1)[0]


def test_nan_on_one_rank_masks_that_parameter_on_every_rank(runs):
    """A NaN in rank 1's shard only: every rank keeps that parameter and its state, updates the others,
    and skips (counted) or raises naming it."""
    for rank in runs[0]:
        result = rank["nonfinite"]
        for policy in ("skip", "raise"):
            assert result[policy]["poisoned_unchanged"] and result[policy]["state_unchanged"], result
            assert result[policy]["others_changed"], result
        assert result["skip"]["raised"] is None and result["skip"]["skipped"] == 1
        assert "NonFiniteGradientError" in result["raise"]["raised"] and worker.POISONED in result["raise"]["raised"]


def test_accumulation_through_gradient_sync_equals_the_ordinary_step(runs):
    """Two micro-batches, the first without gradient sync: one hook per step, the ordinary step's weights."""
    for rank in runs[0]:
        result = rank["accumulation"]
        assert result["hooks"] == 4 and result["weight_rel"] <= 1e-12, result


def test_frozen_and_unused_parameters_do_not_stall_the_collectives(runs):
    """A frozen matrix is left alone; a matrix used on rank 0 only (FSDP2's
    ``set_reduce_scatter_unused_params``) is stepped on both ranks, as the ordinary step does."""
    hooks = set()
    for rank in runs[0]:
        frozen, unused = rank["frozen_and_unused"]["frozen"], rank["frozen_and_unused"]["unused_on_one_rank"]
        assert frozen["weight_rel"] <= 1e-12 and frozen["unchanged"] and frozen["no_state"], frozen
        assert unused["weight_rel"] <= 1e-12, unused
        hooks.add(unused["hooks"])
    assert hooks == {5}  # every step, on every rank


def test_layerwise_moves_what_the_ordinary_sharded_step_moves(runs):
    """Per matrix the same reduce-scatters and all-gathers (left projections), gathers and broadcasts
    (refresh) as the ordinary step; the scalars that the ordinary step sums in one all-reduce per
    bucket go one per parameter (its ‖G‖²) or matrix (the rule's norms), and ``step()`` adds one
    all-reduce of one flag per parameter."""
    comm = runs[0][0]["communication"]
    ordinary, stepped = comm["ordinary"], comm["layerwise"]
    for phase in ("steady", "refresh"):
        assert {k: v for k, v in stepped[phase].items() if k != "all_reduce"} == \
            {k: v for k, v in ordinary[phase].items() if k != "all_reduce"}, comm
        assert stepped[phase]["all_reduce"] == ordinary[phase]["all_reduce"] + comm["parameters"], comm
        assert stepped[f"{phase}_calls"]["all_reduce"] == ordinary[phase]["all_reduce"] + 1, comm
    assert "gather" not in stepped["steady"] and stepped["refresh"]["gather"] > 0


@pytest.mark.parametrize("method", list(worker.RESUMED))
def test_layerwise_resume_from_dcp_is_exact(runs, method):
    for rank in runs[0]:
        result = rank["resume"][method]
        assert result["resumed"] == result["continued"] and result["weights_equal"], result
    if method == "adarankgrad":  # the checkpoint holds matrices whose trigger asks the next step to refresh
        assert runs[0][0]["resume"][method]["flagged"] > 0


@pytest.mark.parametrize("method", list(worker.RESUMED))
def test_layerwise_resume_on_another_world_size(runs, method):
    """The 2-rank checkpoint on 1 rank: the whole-batch losses of the 2-rank continuation."""
    assert runs[1]["resume"][method] == pytest.approx(runs[0][0]["resume"][method]["global_continued"], rel=1e-5)


@pytest.mark.parametrize("method", worker.EIGHT_BIT)
def test_sharded_8bit_moments_follow_the_sharded_32bit_run(runs, method):
    """test_low_precision's criterion on shards (each rank quantizes its own share, in blocks of its
    own: not bit-equal to one process): over 3 seeds the mean |8-bit − 32-bit| of the final loss is
    under a quarter of the 32-bit runs' spread, every matrix moment is quantized on every rank (its
    whole size decides, though each rank holds 16×128 < 4096 values), at ~¼ of the bytes."""
    for rank in runs[0]:
        result = rank["eight_bit"][method]
        spread = max(result["finals"]) - min(result["finals"])
        assert spread > 0 and sum(result["deviations"]) / worker.SEEDS < 0.25 * spread, result
        assert result["quantized"] == ["torch.float32", "torch.uint8"] and result["weight_rel"] < 0.05, result
        if method != "adarankgrad":  # (adaptive ranks fall below the 4096-value minimum here)
            assert result["bytes_8bit"] < 0.3 * result["bytes_32bit"], result


def test_sharded_8bit_resume_is_exact_on_the_same_world_size(runs):
    """The block maxima, laid out per rank in the checkpoint, come back as saved."""
    for rank in runs[0]:
        result = rank["eight_bit_resume"]
        assert result["resumed"] == result["continued"] and result["weights_equal"], result


def test_sharded_8bit_checkpoint_is_requantized_on_another_world_size(runs):
    """On 1 rank the 2-rank 8-bit moments are dequantized with their maxima and quantized again in
    this rank's blocks: within one 8-bit rounding of the saved moments (≤ 2% of their maximum, the
    bound of test_low_precision's precision change), and the run goes on close to the 2-rank one."""
    result = runs[1]["eight_bit"]
    assert result["keys_equal"] and result["uint8"], result
    assert 0 < result["worst"] <= 0.02, result
    continued = runs[0][0]["eight_bit_resume"]["continued"]
    assert result["continued"][0] == continued[0]  # (the loss before the first update on 1 rank)
    assert result["continued"] == pytest.approx(continued, rel=1e-2)


def test_stochastic_rounding_on_shards_is_unbiased_and_ranks_draw_their_own_noise(runs):
    """test_low_precision's unbiasedness on shards: bf16 weights at 1.0 and updates under a tenth of an
    ulp; the mean moves as fp32's with stochastic rounding (matrix: projected, vector: plain), not at
    all to nearest; the ranks' halves, equal before rounding, were rounded differently."""
    for rank in runs[0]:
        result = rank["rounding"]
        for key in ("matrix_mean", "vector_mean"):
            moved = 1.0 - result["fp32"][key]
            assert moved > 2e-4
            assert result["nearest"][key] == 1.0
            assert 1.0 - result["stochastic"][key] == pytest.approx(moved, rel=0.2)
        assert result["stochastic"]["halves_differ"] and not result["nearest"]["halves_differ"]


@pytest.mark.parametrize("case", ["bf16_sr", "bf16_sr_8bit_layerwise"])
def test_stochastic_rounding_on_shards_is_deterministic_and_resumes_exactly(runs, case):
    """bf16 weights with stochastic rounding (alone, and with 8-bit moments, layer-wise: LLaMA-7B's
    recipe): the same losses twice, and from a DCP checkpoint."""
    for rank in runs[0]:
        result = rank[case]
        assert result["runs"][0] == result["runs"][1] == result["resumed"], result
    assert "torch.uint8" in runs[0][0][case]["dtypes"] or case == "bf16_sr"


def test_layerwise_refusals_on_shards_name_the_way_out(runs):
    errors = runs[0][0]["refusals"]
    assert "accumulation_steps=2" in errors["accumulation"]
    assert "set_requires_gradient_sync(False)" in errors["accumulation"]
    assert "capturable=True is not supported" in errors["capturable"]
