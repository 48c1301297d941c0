"""The GPU profiles' padding-free path (ptq_qlora/packing.py) computes what the padded path computes:
same loss and LoRA gradients on the same rows (tiny random Llama, float32, CPU), examples kept apart
by position_ids alone; plus the wiring in ptq_qlora/training.py.

Tolerance: float32, so only summation order differs: relative error < 1e-5 on the loss and < 1e-4 on
the LoRA gradients. The negative control (the same packed rows without position_ids, so examples see
each other) is far above that.
"""
import logging
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ptq_qlora import training
from ptq_qlora.models.tiny import TINY_DEFAULTS
from ptq_qlora.packing import PackedRowsCollator, best_fit_bins, pack_dataset
from ptq_qlora.quantizers.testing import relative_gradient_error

VOCAB, PAD = 259, 258
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n=9, seed=0):
    """Prompt/completion rows of ragged lengths, labels -100 on the prompt (as TRL builds them)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(3, 40, (2,), generator=gen))
        ids = torch.randint(0, 256, (prompt + completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _lora_model(attn):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_DEFAULTS, vocab_size=VOCAB, pad_token_id=PAD,
                                        attn_implementation=attn))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss  # TRL's SFTTrainer passes use_cache=False
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    den = sum((b[k] ** 2).sum() for k in b)
    return float((num / den).sqrt())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_match_padded_batch(attn):
    rows = _rows()
    model = _lora_model(attn)
    padded = DataCollatorForLanguageModeling(pad_token_id=PAD)(rows)  # the padded path's collator
    packed_ds = pack_dataset(Dataset.from_list(rows), pack_length=128)
    assert len(packed_ds) < len(rows)  # several examples share a row
    packed = PackedRowsCollator(PAD)(list(packed_ds))
    assert "attention_mask" not in packed
    assert (packed["input_ids"] == PAD).sum() < (padded["input_ids"] == PAD).sum()

    loss_pad, grads_pad = _loss_and_grads(model, padded)
    loss_pack, grads_pack = _loss_and_grads(model, packed)
    assert abs(float(loss_pack - loss_pad)) / float(loss_pad) < 1e-5
    assert _relative(grads_pack, grads_pad) < 1e-4

    # negative control: the packed rows as plain causal rows, examples attending to each other
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    loss_leak, grads_leak = _loss_and_grads(model, leaky)
    assert _relative(grads_leak, grads_pad) > 1e-2


def test_best_fit_bins_fill_and_keep_every_example():
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(3))] + [900]
    bins = best_fit_bins(lengths, 512)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert [900] in [[lengths[i] for i in b] for b in bins]  # over capacity: a row of its own
    totals = [sum(lengths[i] for i in b) for b in bins if lengths[b[0]] <= 512]
    assert max(totals) <= 512
    assert sum(totals) / (512 * len(totals)) > 0.95  # best fit leaves little padding
    with pytest.raises(ValueError, match="pack_length"):
        best_fit_bins([3], 0)


def test_collator_restarts_positions_and_masks_first_labels():
    batch = PackedRowsCollator(PAD)([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]},
        {"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [2]},
    ])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 2, -100, -100, -100]]
    with pytest.raises(ValueError, match="seq_lengths"):
        PackedRowsCollator(PAD)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lengths": [2]}])


def test_prepare_padding_free_truncates_and_drops_like_trl():
    ds = Dataset.from_list([
        {"input_ids": list(range(10)), "completion_mask": [0] * 6 + [1] * 4},   # kept, cut to 8
        {"input_ids": list(range(12)), "completion_mask": [0] * 9 + [1] * 3},   # only prompt left: dropped
        {"input_ids": list(range(4)), "completion_mask": [0, 1, 1, 1]},
    ])
    packed = training.prepare_padding_free(ds, pack_length=16, max_length=8)
    assert sorted(n for row in packed["seq_lengths"] for n in row) == [4, 8]
    labels = [t for row in packed["labels"] for t in row]
    assert labels.count(-100) == 6 + 1  # prompts of the two kept rows


def test_speed_options_in_trainer_arguments(caplog):
    train_cfg = dict(lr=1e-4, scheduler="constant", epochs=1, max_steps=-1, warmup=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_steps=10, save_total_limit=1)
    hw = SimpleNamespace(name="gpu", device="cuda", dtype="bfloat16", train_batch_size=4, grad_accum=1,
                         dataloader_workers=0, gradient_checkpointing=True, activation_offload=True,
                         use_liger_kernel=True)
    with caplog.at_level(logging.WARNING):
        args = training.trainer_arguments(train_cfg, hw, "/tmp/x", seed=0)
    # the Trainer keeps plain checkpointing; train_tokenized swaps in ptq_qlora/activation_offload.py
    assert "offload" not in (args.get("activation_checkpointing_kwargs") or {})
    assert args["activation_checkpointing"] and training.activation_offload_applies(args, hw)
    import importlib.util

    assert args["use_liger_kernel"] == (importlib.util.find_spec("liger_kernel") is not None)
    if not args["use_liger_kernel"]:
        assert "liger-kernel is not installed" in caplog.text
    cpu = SimpleNamespace(**{**vars(hw), "gradient_checkpointing": False, "use_liger_kernel": False})
    args = training.trainer_arguments(train_cfg, cpu, "/tmp/x", seed=0)
    assert "activation_checkpointing_kwargs" not in args and args["use_liger_kernel"] is False
    assert not training.activation_offload_applies(args, cpu)


def test_fused_optimizer_only_replaces_plain_adamw_on_cuda_outside_fsdp():
    gpu = SimpleNamespace(device="cuda", fused_optimizer=True)
    assert training.optimizer_name("adamw_torch", gpu, {}) == "adamw_torch_fused"
    assert training.optimizer_name("adafactor", gpu, {}) == "adafactor"  # another optimizer is the user's choice
    assert training.optimizer_name("adamw_torch", gpu, {"fsdp": "full_shard"}) == "adamw_torch"
    assert training.optimizer_name("adamw_torch", SimpleNamespace(device="cpu", fused_optimizer=True), {}) == "adamw_torch"
    assert training.optimizer_name("adamw_torch", SimpleNamespace(device="cuda", fused_optimizer=False), {}) == "adamw_torch"


def test_keep_frozen_in_compute_dtype_casts_only_frozen_float32():
    model = _lora_model("sdpa")
    before = {n: p.dtype for n, p in model.named_parameters()}
    cast = training.keep_frozen_in_compute_dtype(model, torch.bfloat16)
    assert cast == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert set(before.values()) == {torch.float32}


def test_train_tokenized_padding_free_on_cpu(tmp_path, monkeypatch):
    """The SFTTrainer runs on packed rows: the collator sees several examples per row."""
    from ptq_qlora.models.tiny import byte_level_tokenizer

    seen = []
    original = PackedRowsCollator.__call__

    def spy(self, features):
        seen.append([len(f["seq_lengths"]) for f in features])
        return original(self, features)

    monkeypatch.setattr(PackedRowsCollator, "__call__", spy)
    rows = _rows(n=24, seed=5)
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]],
                             "length": len(r["input_ids"])} for r in rows])
    model = _lora_model("sdpa")
    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=2,
                         grad_accum=1, dataloader_workers=0, gradient_checkpointing=False, padding_free=True,
                         pack_length=96, num_processes=1, attn_implementation="sdpa",
                         packed_attention="flex_attention")  # no flex backward on CPU: kept at sdpa, warned
    train_cfg = dict(lr=1e-3, scheduler="constant", epochs=1, max_steps=-1, warmup=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_steps=1000, save_total_limit=1,
                     group_by_length=True)
    metrics = training.train_tokenized(model, byte_level_tokenizer(), ds, train_cfg, hw, tmp_path, seed=0,
                                       max_length=64)
    assert metrics["padding_free"] and metrics["train_examples"] == 24
    assert metrics["train_rows"] < 24 and metrics["train_steps"] == -(-metrics["train_rows"] // 2)
    assert max(max(row) for row in seen) > 1  # rows hold several examples, seq_lengths reached the collator
    assert all(torch.isfinite(torch.tensor(metrics["loss_curve"])))
    assert metrics["train_tokens_seen"] == sum(len(r["input_ids"][:64]) for r in rows)


def test_collator_pads_to_fixed_width_unless_a_row_is_longer():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "seq_lengths": [3]}]
    assert PackedRowsCollator(PAD, width=8)(rows)["input_ids"].shape == (1, 8)
    assert PackedRowsCollator(PAD, width=2)(rows)["input_ids"].shape == (1, 3)


def test_packed_attention_is_set_for_training_and_restored():
    from transformers import AutoModelForCausalLM

    from ptq_qlora.models.tiny import tiny_llama_folder
    from ptq_qlora.training import attention_for_packed_rows

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_folder()), attn_implementation="sdpa")
    with attention_for_packed_rows(model, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with attention_for_packed_rows(model, None):
        assert model.config._attn_implementation == "sdpa"


def test_flex_attention_keeps_packed_examples_apart():
    """The block-diagonal mask transformers builds from restarting position_ids, through flex attention
    (forward only: torch has no flex backward on CPU; the GPU check is in benchmarks/RESULTS.md)."""
    from transformers import AutoModelForCausalLM

    from ptq_qlora.models.tiny import tiny_llama_folder

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_folder()), dtype=torch.float32).requires_grad_(False)
    a, b = torch.randint(3, 200, (1, 20)), torch.randint(3, 200, (1, 12))
    separate = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
    model.set_attn_implementation("flex_attention")
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(20), torch.arange(12)])[None],
                   use_cache=False).logits
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


class LoggedKeys(TrainerCallback):
    def __init__(self):
        self.keys = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys |= set(logs or {})


@pytest.mark.parametrize("padding_free", [False, True])
def test_model_loss_trains_on_the_same_loss_as_trls_head(tmp_path, padding_free):
    """hardware.model_loss: the Trainer's loss is the model's own instead of TRL's fused LM head: the same
    loss curve (completion tokens only, padded or packed rows, float32, CPU) and the same trained LoRA
    weights, without TRL's per-step entropy/accuracy metrics (their .item() calls stall a GPU)."""
    from ptq_qlora.models.tiny import byte_level_tokenizer

    rows = _rows(n=12, seed=7)
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]],
                             "length": len(r["input_ids"])} for r in rows])
    train_cfg = dict(lr=1e-2, scheduler="constant", epochs=1, max_steps=3, warmup=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_steps=1000, save_total_limit=1,
                     group_by_length=False)
    results = {}
    for model_loss in (False, True):
        hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=4,
                             grad_accum=1, dataloader_workers=0, gradient_checkpointing=False,
                             padding_free=padding_free, pack_length=96, num_processes=1, attn_implementation="sdpa",
                             model_loss=model_loss)
        model = _lora_model("sdpa")
        logged = LoggedKeys()
        metrics = training.train_tokenized(model, byte_level_tokenizer(), ds, train_cfg, hw,
                                           tmp_path / str(model_loss), seed=0, max_length=64, callbacks=[logged])
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[model_loss] = metrics["loss_curve"], lora
        assert ("entropy" in logged.keys) != model_loss and ("mean_token_accuracy" in logged.keys) != model_loss
    (trl_curve, trl_lora), (own_curve, own_lora) = results[False], results[True]
    assert len(own_curve) == len(trl_curve) == 3
    for ours, theirs in zip(own_curve, trl_curve):
        assert abs(ours - theirs) <= 1e-4 * abs(theirs), (own_curve, trl_curve)
    total, _ = relative_gradient_error(own_lora, trl_lora)  # the weights after 3 AdamW steps
    assert total < 1e-4, total
