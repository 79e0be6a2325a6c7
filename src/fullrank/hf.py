"""fullrank optimizers inside the Hugging Face ``transformers.Trainer``.

One call gives the Trainer's ``optimizer_cls_and_kwargs`` argument::

    from fullrank.hf import optimizer_cls_and_kwargs
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, method="fira", rank=32,
                                                                         target_modules="all-linear", lr=1e-4))

Module targeting follows the Trainer's ``optim_target_modules``: a string is a regular expression
matched against the whole module name (or ``"all-linear"``: every ``nn.Linear`` but the output
layer); a list matches a module when an entry is a substring of its name or fully matches it as a
regular expression. The optimizer's ``state_dict`` holds tensors and plain values only, so the
Trainer's checkpoints (``torch.load(weights_only=True)``) restore it exactly on
``trainer.train(resume_from_checkpoint=...)``.

Learning rate and weight decay: without ``lr`` (``weight_decay``) the optimizer takes
``TrainingArguments.learning_rate`` (``weight_decay``) of the Trainer that builds it, as the
Trainer's own optimizers do; the Trainer's schedule then scales it. A value given here that differs
from the Trainer's raises ``ValueError`` when the Trainer builds the optimizer (at ``train()``), so
the two can never silently disagree. The Trainer is found on the call stack of its
``create_optimizer``; an optimizer built outside a Trainer needs ``lr``.
"""
from __future__ import annotations

import re
import sys
from typing import Iterable

import torch
from torch import nn

from ._quiet import quiet_third_party

quiet_third_party()  # transformers.Trainer imports peft, which imports bitsandbytes (see _quiet.py)

ALL_LINEAR = "all-linear"
# The fine-tuning targets of the Fira paper (§5.3) and of LLM-Adapters' LoRA: Q, K, V, Up, Down.
PAPER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def target_module_names(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``target_modules`` selects (see module doc)."""
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            output = _output_layer(model)
            return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output and n.split(".")[-1] != "lm_head"]
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({err})") from None
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be 'all-linear', a regular expression or a non-empty list of names, got {target_modules!r}")
    patterns = []
    for t in targets:
        try:
            patterns.append(re.compile(t))
        except re.error:
            patterns.append(None)  # a plain name that is not a valid pattern still matches as a substring
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(t in n or (p is not None and p.fullmatch(n)) for t, p in zip(targets, patterns))
    ]


def param_groups(model: nn.Module, rank: int, target_modules: str | Iterable[str] = PAPER_TARGET_MODULES,
                 update_proj_gap: int = 200, scale: float | None = None, proj_type: str = "std", **options) -> list[dict]:
    """``fullrank.param_groups`` with Trainer-style targeting: exactly the selected trainable Linear
    weights are projected; every other trainable parameter is in the plain AdamW group."""
    import fullrank

    names = target_module_names(model, target_modules)
    selected = {f"{n}.weight" for n in names}
    trainable_selected = [n for n, p in model.named_parameters() if n in selected and p.requires_grad]
    if not trainable_selected:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} selects no trainable nn.Linear weight; the model's Linear modules "
            f"are: {', '.join(linears[:6]) or 'none'}{' ...' if len(linears) > 6 else ''}"
        )
    groups = fullrank.param_groups(model, rank=rank, target_modules=names, update_proj_gap=update_proj_gap,
                                   scale=scale, proj_type=proj_type, **options)
    projected, plain = groups[0], (groups[1] if len(groups) > 1 else {"params": [], "param_names": []})
    keep = [(p, n) for p, n in zip(projected["params"], projected["param_names"]) if n in selected]
    moved = [(p, n) for p, n in zip(projected["params"], projected["param_names"]) if n not in selected]
    projected["params"], projected["param_names"] = [p for p, _ in keep], [n for _, n in keep]
    plain["params"] = [p for p, _ in moved] + list(plain["params"])
    plain["param_names"] = [n for _, n in moved] + list(plain["param_names"])
    return [projected, plain] if plain["params"] else [projected]


def trainable_group(model: nn.Module) -> list[dict]:
    """One param group of every trainable parameter (AdamW, LoRA adapters), with ``param_names``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


def _calling_trainer(depth: int = 8):
    """The ``transformers.Trainer`` whose method is on the call stack (``create_optimizer``), or None."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return None
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_module.Trainer):
            return candidate
    return None


def _resolve(name: str, given: float | None, trainer_value: float | None, argument: str) -> float | None:
    """``given``, else the Trainer's value; ValueError when both exist and differ."""
    if given is None:
        return trainer_value
    if trainer_value is not None and float(given) != float(trainer_value):
        raise ValueError(
            f"optimizer_cls_and_kwargs({name}={given!r}) disagrees with TrainingArguments.{argument}={trainer_value!r}: "
            f"the optimizer would train with {name}={given!r}. Leave {name} out (it is then taken from the "
            f"TrainingArguments) or pass the same value to both"
        )
    return given


class FullrankOptimizer(torch.optim.Optimizer):
    """Stand-in class for the Trainer: ``FullrankOptimizer(groups, method=..., **kw)`` returns
    ``fullrank.make_optimizer(method, groups, **kw)`` (a ``torch.optim.Optimizer`` subclass, so the
    Trainer calls it with the ``params`` given in the kwargs). ``lr``/``weight_decay`` of None come
    from the calling Trainer's ``TrainingArguments`` (see the module doc)."""

    def __new__(cls, params, method: str = "fira", lr: float | None = None, weight_decay: float | None = None,
                **kwargs):
        import fullrank

        trainer = _calling_trainer()
        args = getattr(trainer, "args", None)
        lr = _resolve("lr", lr, getattr(args, "learning_rate", None), "learning_rate")
        weight_decay = _resolve("weight_decay", weight_decay, getattr(args, "weight_decay", None), "weight_decay")
        if lr is None:
            raise ValueError("FullrankOptimizer: lr is required outside transformers.Trainer (inside one it is "
                             "TrainingArguments.learning_rate); pass lr=")
        return fullrank.make_optimizer(method, params, lr=lr, weight_decay=0.0 if weight_decay is None else weight_decay,
                                       **kwargs)


def optimizer_cls_and_kwargs(model: nn.Module, method: str = "fira", *, rank: int = 32,
                             target_modules: str | Iterable[str] = PAPER_TARGET_MODULES, lr: float | None = None,
                             weight_decay: float | None = None, update_proj_gap: int = 200, scale: float | None = None,
                             proj_type: str = "std", layerwise: bool = False, **options) -> tuple[type, dict]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` with a fullrank optimizer.

    ``method`` is any of ``fullrank.optimizer_methods()``; ``"adamw"`` trains every trainable
    parameter with AdamW (use it for a LoRA/peft model). ``lr`` and ``weight_decay`` default to the
    Trainer's ``TrainingArguments.learning_rate`` and ``weight_decay``; a value given here must equal
    them (else ``ValueError`` at ``train()``). Other ``options`` go to the engine (e.g. ``betas``,
    ``eps``, ``seed``). Bad options raise ``ValueError`` here, not in the Trainer. Use the tuple for
    one Trainer (the Trainer removes ``params`` from it).
    """
    import fullrank

    if layerwise:
        raise ValueError(
            "layerwise=True: not supported inside transformers.Trainer, which clips gradients and steps the optimizer "
            "after backward; use fullrank.layerwise(model, ...) in your own training loop (or `fullrank pretrain --layerwise`)"
        )
    if method not in fullrank.optimizer_methods():
        raise ValueError(f"method must be one of {', '.join(fullrank.optimizer_methods())}, got {method!r}")
    if method == "adamw":
        groups = trainable_group(model)
    else:
        groups = param_groups(model, rank, target_modules, update_proj_gap, scale, proj_type)
    kwargs = {"method": method, "lr": lr, "weight_decay": weight_decay, **options}
    check = {**options, "lr": 1e-3 if lr is None else lr, "weight_decay": 0.0 if weight_decay is None else weight_decay}
    fullrank.make_optimizer(method, groups, **check)  # checks the options now
    return FullrankOptimizer, {"params": groups, **kwargs}


def unwrap_optimizer(optimizer):
    """The fullrank optimizer inside the Trainer's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
