"""fullrank optimizers inside ``transformers.Trainer``: targeting, training, memory, save/resume."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import fullrank
from fullrank import hf
from fullrank.finetune.data import PadCollator, PromptEncoder, encode_dataset
from finetune_fixtures import synthetic_record, word_tokenizer


def tiny_llama(seed=0, vocab=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256,
                                        pad_token_id=0, tie_word_embeddings=False))


def test_target_modules_like_the_trainer():
    model = tiny_llama()
    every = hf.target_module_names(model, "all-linear")
    assert len(every) == 14 and "lm_head" not in every
    assert hf.target_module_names(model, r".*layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert len(hf.target_module_names(model, ["q_proj", r".*\.down_proj"])) == 4
    groups = hf.param_groups(model, rank=4, target_modules=["model.layers.1.mlp.up_proj"])
    assert groups[0]["param_names"] == ["model.layers.1.mlp.up_proj.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="selects no trainable nn.Linear"):
        hf.param_groups(model, rank=4, target_modules=["nothing"])


def test_bad_options_fail_at_the_call():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layerwise"):
        hf.optimizer_cls_and_kwargs(model, "fira", layerwise=True)
    with pytest.raises(ValueError, match="method must be one of"):
        hf.optimizer_cls_and_kwargs(model, "adam8bit")
    with pytest.raises(ValueError):
        hf.optimizer_cls_and_kwargs(model, "fira", rank=0)


def _dataset(n=96):
    import random

    tokenizer = word_tokenizer()
    rng = random.Random(0)
    examples, _ = encode_dataset([synthetic_record(rng) for _ in range(n)], PromptEncoder(tokenizer), 256)
    return examples, tokenizer


def _trainer(tmp_path, method, max_steps=12, save_steps=1000, seed=0, **optimizer_kwargs):
    examples, tokenizer = _dataset()
    model = tiny_llama(seed, vocab=len(tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=3e-3,
                             lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_steps=save_steps,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=seed, remove_unused_columns=False)
    optimizer_kwargs = optimizer_kwargs or {"lr": 3e-3}
    optimizer = hf.optimizer_cls_and_kwargs(model, method, rank=4, target_modules="all-linear", update_proj_gap=5,
                                            **optimizer_kwargs)
    return Trainer(model=model, args=args, train_dataset=examples, data_collator=PadCollator(tokenizer.pad_token_id),
                   optimizer_cls_and_kwargs=optimizer)


def _losses(trainer):
    return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}


def test_trainer_trains_with_fira_in_less_state_than_adamw(tmp_path):
    torch.set_num_threads(1)
    fira = _trainer(tmp_path / "fira", "fira")
    fira.train()
    losses = _losses(fira)
    assert isinstance(hf.unwrap_optimizer(fira.optimizer), fullrank.Fira)
    values = list(losses.values())
    assert len(values) == 12 and sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.5  # nats
    adamw = _trainer(tmp_path / "adamw", "adamw")
    adamw.train()
    fira_bytes = fullrank.memory.optimizer_state_bytes(hf.unwrap_optimizer(fira.optimizer))
    adamw_bytes = fullrank.memory.optimizer_state_bytes(hf.unwrap_optimizer(adamw.optimizer))
    assert 0 < fira_bytes < adamw_bytes


@pytest.mark.parametrize("method", ["fira", "galore"])
def test_trainer_checkpoint_resume_gives_identical_losses(tmp_path, method):
    torch.set_num_threads(1)
    full = _trainer(tmp_path / "a", method, max_steps=10, save_steps=5)
    full.train()
    expected = _losses(full)
    resumed = _trainer(tmp_path / "a", method, max_steps=10, save_steps=5, seed=0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    got = _losses(resumed)
    # steps 1-5 come from the checkpoint's trainer_state.json, 6-10 are recomputed; update_proj_gap 5
    # puts a subspace refresh right at the checkpoint
    assert sorted(got) == list(range(1, 11)) and got == expected
    saved, restored = hf.unwrap_optimizer(full.optimizer).state_dict(), hf.unwrap_optimizer(resumed.optimizer).state_dict()
    for key, state in saved["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(restored["state"][key][name], value, rtol=0, atol=0)


def test_trainer_lr_and_weight_decay_come_from_the_training_arguments(tmp_path):
    """Without ``lr=``, the optimizer trains at ``TrainingArguments.learning_rate`` (not a default of its own)."""
    torch.set_num_threads(1)
    examples, tokenizer = _dataset(16)
    model = tiny_llama(vocab=len(tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=7e-3,
                             weight_decay=0.01, lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=PadCollator(tokenizer.pad_token_id),
                      optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(model, "fira", rank=4,
                                                                             target_modules="all-linear"))
    trainer.train()
    optimizer = hf.unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, fullrank.Fira) and optimizer.state
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(7e-3, 0.01)] * 2


@pytest.mark.parametrize("given, argument", [({"lr": 1e-4}, "learning_rate=0.003"),
                                             ({"lr": 3e-3, "weight_decay": 0.1}, "weight_decay=0.0")])
def test_trainer_refuses_an_optimizer_setting_that_disagrees_with_the_training_arguments(tmp_path, given, argument):
    trainer = _trainer(tmp_path, "fira", max_steps=1, **given)
    name = "lr" if "weight_decay" not in given else "weight_decay"
    with pytest.raises(ValueError, match=rf"{name}=.*disagrees with TrainingArguments\.{argument}"):
        trainer.train()


def test_optimizer_outside_a_trainer_needs_lr():
    groups = hf.param_groups(tiny_llama(), rank=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="lr is required outside transformers.Trainer"):
        hf.FullrankOptimizer(groups, method="fira")
    assert hf.FullrankOptimizer(groups, method="fira", lr=2e-3).param_groups[0]["lr"] == 2e-3
