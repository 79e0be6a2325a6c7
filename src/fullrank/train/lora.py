"""LoRA and ReLoRA baselines through ``peft``.

LoRA adapts the same ``nn.Linear`` modules that Fira/GaLore project, at the same rank; as in the
ReLoRA and GaLore baselines, embeddings, norms and ``lm_head`` are trained fully. ReLoRA (Lialin et
al., 2023) merges the adapters into the frozen weights every ``relora_every`` steps, re-initialises
them, prunes their optimizer moments and re-warms the learning rate (see ``schedule.py``).
"""
from __future__ import annotations


import torch

from .._quiet import no_transformers_deprecations, quiet_third_party

quiet_third_party()  # peft imports bitsandbytes, whose CPU backend logs about optional 4-bit kernels (_quiet.py)
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn


def apply_lora(model: nn.Module, module_names: list[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``module_names``; every non-adapted weight stays trainable."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=module_names, bias="none")
    with no_transformers_deprecations():
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        param.requires_grad = ".base_layer." not in name  # only the adapted (projected) weights are frozen
    return peft_model


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


@torch.no_grad()
def relora_restart(model: nn.Module, optimizer: torch.optim.Optimizer, prune: float) -> int:
    """Merge every adapter into its base weight, re-initialise it (A: Kaiming, B: 0) and prune the
    optimizer moments of the adapter parameters; returns the number of merged modules."""
    merged, params = 0, []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                base = module.get_base_layer()
                base.weight.add_(module.get_delta_weight(adapter).to(base.weight.dtype))
                module.reset_lora_parameters(adapter, True)
                params += [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
                merged += 1
    for param in params:
        state = optimizer.state.get(param)
        if state and "exp_avg" in state:
            prune_moments_(state["exp_avg"], state.get("exp_avg_sq"), prune)
    return merged


def prune_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None, fraction: float) -> None:
    """Zero the ``fraction`` of Adam's entries with the smallest first moment (all of them for 1.0),
    in both moments at once: an entry with a first moment but no second one would take a step of
    size m / eps."""
    count = int(fraction * exp_avg.numel())
    if count <= 0:
        return
    if count >= exp_avg.numel():
        mask = torch.ones_like(exp_avg, dtype=torch.bool)
    else:
        mask = exp_avg.abs() <= exp_avg.abs().flatten().kthvalue(count).values
    exp_avg.masked_fill_(mask, 0.0)
    if exp_avg_sq is not None:
        exp_avg_sq.masked_fill_(mask, 0.0)
