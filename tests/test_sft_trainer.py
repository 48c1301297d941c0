"""ptq_qlora/sft_trainer.py: the stage's Trainer does less host work per step without changing what it
trains or logs: the FLOP count per token is computed once (same totals), and with
`hardware.deferred_step_syncs` the token count is read once a step, after the optimizer step is queued
(same counts at every step's end, for every callback), and the logged loss is no longer NaN-filtered.
Tiny random Llama, float32, CPU."""
import inspect
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

from ptq_qlora import training
from ptq_qlora.models.tiny import TINY_DEFAULTS, byte_level_tokenizer
from ptq_qlora.sft_trainer import project_trainer_class

VOCAB, PAD = 259, 258


def _model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_DEFAULTS, vocab_size=VOCAB, pad_token_id=PAD))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def test_flops_per_token_computed_once_give_transformers_totals(monkeypatch):
    cls = project_trainer_class()
    trainer = cls.__new__(cls)  # only .model is read
    trainer.model = _model()
    first = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    assert trainer.floating_point_ops(first) == Trainer.floating_point_ops(trainer, first) > 0
    later = {"input_ids": torch.zeros(3, 7, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, later)
    monkeypatch.setattr(LlamaForCausalLM, "num_parameters", lambda *a, **k: pytest.fail("walked the parameters"))
    assert trainer.floating_point_ops(later) == expected


class SeenAtStepEnd(TrainerCallback):
    def __init__(self):
        self.tokens = []

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.append(state.num_input_tokens_seen)


def _train(tmp_path, deferred: bool, monkeypatch, grad_accum: int = 2):
    """Train 3 steps; returns the loss curve, the tokens seen at each step's end and the names of the
    functions that called Tensor.item()."""
    callers = []
    item = torch.Tensor.item

    def spy(self):
        callers.append(inspect.stack()[1].function)
        return item(self)

    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(24):
        n = int(torch.randint(8, 30, (1,), generator=gen))
        ids = torch.randint(0, 250, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * (n // 2) + [1] * (n - n // 2), "length": n})
    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=4,
                         grad_accum=grad_accum, dataloader_workers=0, gradient_checkpointing=False, padding_free=False,
                         num_processes=1, attn_implementation="sdpa", deferred_step_syncs=deferred)
    cfg = dict(lr=1e-2, scheduler="constant", epochs=1, max_steps=3, warmup=0, weight_decay=0.0, max_grad_norm=1.0,
               optim="adamw_torch", logging_steps=1, save_steps=1000, save_total_limit=1, group_by_length=False)
    seen = SeenAtStepEnd()
    monkeypatch.setattr(torch.Tensor, "item", spy)
    try:
        metrics = training.train_tokenized(_model(), byte_level_tokenizer(), Dataset.from_list(rows), cfg, hw,
                                           tmp_path / str(deferred), seed=0, max_length=64, callbacks=[seen])
    finally:
        monkeypatch.setattr(torch.Tensor, "item", item)
    return metrics, seen.tokens, set(callers)


def test_deferred_step_syncs_count_the_same_tokens_once_a_step(tmp_path, monkeypatch):
    plain, plain_seen, plain_callers = _train(tmp_path, False, monkeypatch)
    deferred, deferred_seen, deferred_callers = _train(tmp_path, True, monkeypatch)
    assert "_track_num_input_tokens" in plain_callers  # the negative control: transformers reads it each micro-batch
    assert "_track_num_input_tokens" not in deferred_callers and "flush_token_count" in deferred_callers
    assert deferred_seen == plain_seen and len(set(plain_seen)) == 3  # every callback sees the step's count
    assert deferred["train_tokens_seen"] == plain["train_tokens_seen"] > 0
    assert deferred["loss_curve"] == plain["loss_curve"]  # the same training, bit for bit


def test_deferred_step_syncs_stop_the_nan_filter_of_the_logged_loss(tmp_path):
    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_batch_size=2, grad_accum=1,
                         dataloader_workers=0, gradient_checkpointing=False, num_processes=1)
    cfg = dict(lr=1e-3, scheduler="constant", epochs=1, max_steps=1, warmup=0, weight_decay=0.0, max_grad_norm=1.0,
               optim="adamw_torch", logging_steps=1, save_steps=10, save_total_limit=1)
    assert training.trainer_arguments(cfg, hw, tmp_path, seed=0)["logging_nan_inf_filter"]
    hw.deferred_step_syncs = True
    assert not training.trainer_arguments(cfg, hw, tmp_path, seed=0)["logging_nan_inf_filter"]
