"""fullrank.titan: fullrank's optimizers inside torchtitan 0.3.0 (its config registry, optimizer
container and DCP checkpoint manager), on the CPU. The 2-process runs are in tests/titan_worker.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchtitan.models.llama3",
                    reason='torchtitan 0.3.0 and its model code are needed: pip install "fullrank[titan]" '
                           "(with a CPU-only torch also: pip install triton)")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from torchtitan.components.optimizer import ParamGroupConfig  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402

import fullrank  # noqa: E402
from fullrank.titan import CheckpointManager, SubspaceOptimizersContainer, subspace_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import titan_worker  # noqa: E402
from processes import spawn as spawn_processes  # noqa: E402

REGISTRY = ["--module", "fullrank.titan", "--config"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("titan")
    spawn_processes(titan_worker.main, args=(2, str(tmp / "init"), str(tmp)), nprocs=2)
    return json.loads((tmp / "titan.json").read_text())


@pytest.fixture(scope="module")
def debugmodel_fira():
    """``--module fullrank.titan --config llama3_debugmodel_fira`` as torchtitan.train parses it, and the
    debug model it names, built on the CPU."""
    config = ConfigManager().parse_args([*REGISTRY, "llama3_debugmodel_fira"])
    torch.manual_seed(0)
    return config, config.model_spec.model.build()


def test_container_steps_equal_fullrank_fsdp_path(runs):
    """4 steps with refreshes at steps 1 and 3, float64, on both ranks: the container built from
    torchtitan's config gives the weights of fullrank.param_groups + make_optimizer on the same FSDP2
    model, to the bit (the same groups in the same order run the same operations)."""
    for rank in runs:
        result = rank["equivalence"]
        assert result["container"]["weight_rel"] <= 1e-12, result["container"]
        assert result["container"]["bitwise"], result["container"]
        assert result["losses"]["container"] == result["losses"]["reference"]
        assert result["optimizer"] == "Fira"
        linear = 5 * titan_worker.LAYERS  # wqkv, wo, w1, w2, w3 per block
        assert result["reference_groups"] == [[linear, titan_worker.RANK], [2 * titan_worker.LAYERS + 3, None]]
        assert [g["params"] for g in result["groups"]] == [linear, 2 * titan_worker.LAYERS + 3]
        projected, plain = result["groups"]
        assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["gamma"]) == (
            titan_worker.RANK, titan_worker.GAP, titan_worker.SCALE, 1.01)
        assert plain["rank"] is None


def test_comparison_sees_another_gap_or_rank(runs):
    """The same comparison fails for a container at T = 3 (its second refresh comes a step later: the
    losses part at step 4) or at half the rank (they part after the first update)."""
    result = runs[0]["equivalence"]
    losses = result["losses"]
    assert result["other_gap"]["weight_rel"] > 1e-3 and not result["other_gap"]["bitwise"]
    assert losses["other_gap"][:3] == losses["reference"][:3] and losses["other_gap"][3] != losses["reference"][3]
    assert result["other_rank"]["weight_rel"] > 1e-3 and losses["other_rank"][1] != losses["reference"][1]


@pytest.mark.parametrize("method", titan_worker.RESUMED)
def test_checkpoint_manager_resumes_exactly(runs, method):
    """3 steps, torchtitan's CheckpointManager saves (DCP, 2 ranks), 3 more steps; a fresh model with
    other weights, container and LR schedulers loaded from the checkpoint runs the same 3 steps to the
    bit (a refresh among them). AdaRankGrad's ranks differ per matrix: its state's shapes can only come
    from the checkpoint. "mixed" has torchtitan's AdamW beside Fira in one container; Flora keeps DTensor
    state in torchtitan's layout and holds its seeds before its first step (torchtitan's own
    ``init_optim_state`` would leave its moments out of the load template, and the resumed losses would
    differ from the second step on)."""
    for rank in runs:
        result = rank["resume"][method]
        assert result["loaded_step"] == titan_worker.SAVED_AT
        assert result["resumed"] == result["continued"], result
        assert result["bitwise"] and result["weight_rel"] == 0.0, result
    if method == "adarankgrad":
        assert len(runs[0]["resume"][method]["ranks"]) > 1, runs[0]["resume"][method]
    if method == "mixed":
        assert runs[0]["resume"][method]["optimizers"] == ["Fira", "AdamW"]


def test_registry_resolves_debugmodel_fira(debugmodel_fira):
    """The config registry gives torchtitan's debug model with fullrank's container and checkpointer;
    the container puts the 30 linear weights of the 6 blocks in the projected group (the paper's
    settings at rank 64) and the embeddings, norms and lm_head in the plain group."""
    config, model = debugmodel_fira
    assert type(config.optimizer) is SubspaceOptimizersContainer.Config
    assert type(config.checkpoint) is CheckpointManager.Config
    assert config.checkpoint.interval == 10 and config.checkpoint.last_save_model_only is False  # torchtitan's
    container = config.optimizer.build(model_parts=[model])
    (optimizer,) = container.optimizers
    assert isinstance(optimizer, fullrank.Fira)
    projected, plain = optimizer.param_groups
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["gamma"],
            projected["lr"]) == (64, 200, 0.25, 1.01, 0.01)
    assert len(projected["params"]) == 30 and all(p.dim() == 2 for p in projected["params"])
    assert all((".attention." in n or ".feed_forward." in n) and "norm" not in n for n in projected["param_names"])
    assert "rank" not in plain
    assert {"tok_embeddings.weight", "norm.weight", "lm_head.weight", "layers.0.attention_norm.weight",
            "layers.5.ffn_norm.weight"} <= set(plain["param_names"])
    assert len(projected["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_registry_command_line_overrides_group_options(debugmodel_fira):
    _, model = debugmodel_fira
    config = ConfigManager().parse_args([*REGISTRY, "llama3_debugmodel_fira",
                                         "--optimizer.param-groups.0.optimizer-kwargs.rank", "8",
                                         "--optimizer.param-groups.0.optimizer-kwargs.update-proj-gap", "50"])
    projected = config.optimizer.build(model_parts=[model]).optimizers[0].param_groups[0]
    assert (projected["rank"], projected["update_proj_gap"]) == (8, 50)


def test_registry_8b_fira_has_the_paper_settings():
    """llama3_8b_fira: lr 0.01, T = 200, α = 0.0625 (≥ 1B), γ = 1.01, rank 1024 (the paper's 7B); its
    container builds on the meta-device 8B model (every linear weight takes rank 1024)."""
    config = ConfigManager().parse_args([*REGISTRY, "llama3_8b_fira"])
    with torch.device("meta"):
        model = config.model_spec.model.build()
    projected, plain = config.optimizer.build(model_parts=[model]).optimizers[0].param_groups
    assert (projected["lr"], projected["update_proj_gap"], projected["scale"], projected["gamma"],
            projected["rank"]) == (0.01, 200, 0.0625, 1.01, 1024)
    assert len(projected["params"]) == 32 * 5 and plain["lr"] == 0.01


def _container(model, projected_kwargs: dict, name: str = "fira", **config):
    groups = [ParamGroupConfig(pattern=fullrank.titan.LLAMA3_PROJECTED_PATTERN, optimizer_name=name,
                               optimizer_kwargs={"lr": 0.01, **projected_kwargs}),
              ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs={"lr": 0.01})]
    return SubspaceOptimizersContainer.Config(param_groups=groups, **config).build(model_parts=[model])


def test_bad_optimizer_kwargs_are_refused_by_name(debugmodel_fira):
    _, model = debugmodel_fira
    with pytest.raises(ValueError, match=r"unknown optimizer_kwargs 'rnak'.*group options of fullrank method "
                                         r"'fira' are: .*rank.*update_proj_gap"):
        _container(model, {"rnak": 8})
    for rank in (0, -4):
        with pytest.raises(ValueError, match=rf"rank of parameter 'layers\.0\.attention\.qkv_linear\.wqkv\.weight' "
                                             rf"\(768, 256\) must be an integer in \[1, 256\], got {rank}"):
            _container(model, {"rank": rank})
    with pytest.raises(ValueError, match=r"gamma must be a number in \[1\.0, inf\], got 0\.5"):
        _container(model, {"rank": 8, "gamma": 0.5})
    with pytest.raises(ValueError, match=r"'scaling'.*optimizer_factory_kwargs_by_name\['fira'\]"):
        _container(model, {"rank": 8, "scaling": "matrix"})
    with pytest.raises(ValueError, match=r"optimizer_name must be a fullrank method \(adamw, .*fira.*\) or one of "
                                         r"torchtitan's \(Adam, AdamW, DistMuon\), got 'firra'"):
        _container(model, {"rank": 8}, name="firra")
    with pytest.raises(TypeError, match="Fira got unknown option"):
        _container(model, {"rank": 8}, optimizer_factory_kwargs_by_name={"fira": {"scailing": "matrix"}})


def test_optimizer_wide_arguments_go_through_the_factory_kwargs(debugmodel_fira):
    _, model = debugmodel_fira
    container = _container(model, {"rank": 8}, optimizer_factory_kwargs_by_name={"fira": {"scaling": "matrix"}})
    assert container.optimizers[0].param_groups[0]["residual"] == "scale_matrix"


def test_every_method_builds_from_subspace_optimizer(debugmodel_fira):
    """Each name of fullrank.optimizer_methods() gives a working container config: T and α are only
    written when given, so Flora, SGD and SCALE, which do not take them, are not handed them."""
    _, model = debugmodel_fira
    for method in fullrank.optimizer_methods():
        (optimizer,) = subspace_optimizer(method, rank=8).build(model_parts=[model]).optimizers
        if isinstance(optimizer, fullrank.SubspaceAdamW) and method != "adamw8bit":
            assert optimizer.param_groups[0]["rank"] == (1 if method == "apollo_mini" else 8), method
            assert len(optimizer.param_groups[0]["params"]) == 30, method


def test_subspace_optimizer_checks_its_arguments():
    with pytest.raises(ValueError, match=r"method must be one of \(.*'fira'.*\), got 'fira2'"):
        subspace_optimizer("fira2")
    with pytest.raises(ValueError, match=r"projected_pattern must be a regular expression, got '\(unclosed'"):
        subspace_optimizer("fira", projected_pattern="(unclosed")


def test_generic_load_path_is_refused_with_the_reason(debugmodel_fira):
    """torchtitan's plain CheckpointManager would hand load_state_dict a template built before the
    checkpoint is read (no state before the first step, fixed ranks): refused, naming the fix."""
    _, model = debugmodel_fira
    container = _container(model, {"rank": 8})
    with pytest.raises(RuntimeError, match=r"fullrank\.titan\.CheckpointManager\.Config"):
        container.load_state_dict(container.state_dict())


def test_import_without_torchtitan_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "fullrank.titan" or n.startswith("fullrank.titan.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchtitan", None)
    message = r'fullrank\.titan needs torchtitan 0\.3\.0 .*pip install "fullrank\[titan\]"'
    with pytest.raises(ImportError, match=message):
        import fullrank.titan  # noqa: F401


def test_import_fullrank_does_not_import_torchtitan():
    code = "import sys, fullrank; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchtitan'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
