"""GPTQ base under LoRA through FrozenDequantMatmul (hardware.gptq_dequant_matmul, the GPU profiles'
path): the same loss and LoRA gradients as gptqmodel's trainable kernel, without keeping any
dequantized weight for the backward. CPU, tiny random GPTQ model, float32."""
import pytest
import torch

from ptq_qlora.adapters import attach_lora
from ptq_qlora.quantizers import QuantizerConfig, load_quantized, quantize
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.gptq_frozen import use_frozen_dequant_matmul
from ptq_qlora.quantizers.testing import build_tiny_llama, byte_level_tokenizer, lora_gradients, random_texts, \
    relative_gradient_error

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPTQ = QuantizerConfig(name="gptq-4bit", method="gptq", label="PTQ-GPTQ-4bit", bits=4, group_size=32,
                       calibration_samples=16, min_calibration_samples=8, calibration_max_tokens=64)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq_frozen")
    quantize(GPTQ, build_tiny_llama(root / "sft"), root / "gptq", byte_level_tokenizer(), random_texts(24), "float32")
    return root / "gptq"


def _lora_model(gptq_dir, frozen: bool):
    model = load_quantized(GPTQ, gptq_dir, compute_dtype="float32", for_training=True)
    torch.manual_seed(0)  # the same LoRA A init in both models
    model = attach_lora(model, TARGETS, r=4, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    patched = use_frozen_dequant_matmul(model) if frozen else 0
    return model, patched


def _saved_shapes(model, batch) -> set[tuple]:
    shapes = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.add(tuple(t.shape)) or t, lambda t: t):
        lora_gradients(model, batch)
    return shapes


def test_frozen_dequant_matmul_matches_the_trainable_kernel_and_saves_no_weight(gptq_dir):
    batch = probe_input_ids(259, batch=2, length=24)
    plain, _ = _lora_model(gptq_dir, frozen=False)
    frozen, patched = _lora_model(gptq_dir, frozen=True)
    quantized = [m for m in frozen.modules() if hasattr(m, "qweight")]
    assert patched == len(quantized) == 7 * frozen.config.num_hidden_layers

    loss_plain, grads_plain = lora_gradients(plain, batch)
    loss_frozen, grads_frozen = lora_gradients(frozen, batch)
    assert abs(loss_frozen - loss_plain) <= 1e-6 * abs(loss_plain)
    total, worst = relative_gradient_error(grads_frozen, grads_plain)
    assert total < 1e-5 and worst < 1e-4, (total, worst)
    assert all(g.abs().sum() > 0 for g in grads_frozen.values())

    weight_shapes = {(m.in_features, m.out_features) for m in quantized}
    weight_shapes |= {(o, i) for i, o in weight_shapes}
    assert _saved_shapes(plain, batch) & weight_shapes  # the stock path keeps dequantized weights...
    assert not _saved_shapes(frozen, batch) & weight_shapes  # ...this one keeps none


def test_bias_and_leading_dims_pass_through(gptq_dir):
    frozen, _ = _lora_model(gptq_dir, frozen=True)
    layer = next(m for m in frozen.modules() if hasattr(m, "qweight"))
    layer.bias = torch.nn.Parameter(torch.randn(layer.out_features), requires_grad=False)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    expected = x.detach() @ layer.dequantize_weight().float() + layer.bias
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * expected) @ layer.dequantize_weight().float().t(), rtol=1e-4, atol=1e-4)


def test_pack_impl_reaches_gptqmodel_and_keeps_the_bytes(gptq_dir, tmp_path, monkeypatch):
    """quantizer.pack_impl (gptqmodel's packing implementation) is passed on and writes the same checkpoint."""
    from dataclasses import replace

    import gptqmodel
    from safetensors.torch import load_file

    original_config, seen = gptqmodel.QuantizeConfig, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("pack_impl"))
        return original_config(*args, **kwargs)

    monkeypatch.setattr(gptqmodel, "QuantizeConfig", spy)
    quantize(replace(GPTQ, pack_impl="original"), gptq_dir.parent / "sft", tmp_path / "original",
             byte_level_tokenizer(), random_texts(24), "float32")
    assert seen == ["original"]
    ours = load_file(str(gptq_dir / "model.safetensors"))
    original = load_file(str(tmp_path / "original" / "model.safetensors"))
    assert ours.keys() == original.keys()
    for key in ours:
        assert torch.equal(ours[key], original[key]), key


def test_fused_lora_over_gptq_matches_the_trainable_kernel(gptq_dir):
    """hardware.fused_lora over a GPTQ base: base matmul and LoRA in one autograd function, the
    weight dequantized in forward and backward: gptqmodel's loss and LoRA gradients, no weight kept."""
    from ptq_qlora.adapters.fused_lora import fuse_lora_layers

    batch = probe_input_ids(259, batch=2, length=24)
    plain, _ = _lora_model(gptq_dir, frozen=False)
    fused, _ = _lora_model(gptq_dir, frozen=False)
    assert fuse_lora_layers(fused) == 7 * fused.config.num_hidden_layers
    loss_plain, grads_plain = lora_gradients(plain, batch)
    loss_fused, grads_fused = lora_gradients(fused, batch)
    assert abs(loss_fused - loss_plain) <= 1e-6 * abs(loss_plain)
    total, worst = relative_gradient_error(grads_fused, grads_plain)
    assert total < 1e-5 and worst < 1e-4, (total, worst)
    quantized = [m for m in fused.modules() if hasattr(m, "qweight")]
    weight_shapes = {(m.in_features, m.out_features) for m in quantized}
    weight_shapes |= {(o, i) for i, o in weight_shapes}
    assert not _saved_shapes(fused, batch) & weight_shapes


def test_training_loads_drop_the_compiled_dequantizer_and_are_freed(gptq_dir):
    """A GPTQ model whose torch.compile'd dequantizer ran is never freed (seen on an H200: ~4 GiB per 7B
    left allocated); models loaded for training carry no compiled dequantizer and are collected."""
    import gc
    import weakref

    model = load_quantized(GPTQ, gptq_dir, compute_dtype="float32", for_training=True)
    layers = [m for m in model.modules() if hasattr(m, "qweight")]
    assert layers and not any("dequantize_weight" in vars(m) for m in layers)
    with torch.no_grad():
        model(input_ids=probe_input_ids(259, batch=1, length=8))
    alive = weakref.ref(model)
    del model, layers
    gc.collect()
    assert alive() is None


def test_a_model_loaded_by_the_call_that_first_imports_gptqmodel_is_freed(gptq_dir):
    """gptqmodel's import keeps its frames, and through f_back its caller's frame and locals: the eval
    model loaded by the call that first imported it stayed alive (on an H200: 0.91 GiB of a 4-layer 7B
    never given back). A fresh interpreter, so that this load is the first import."""
    import subprocess
    import sys

    code = f"""
import gc, weakref, torch
from ptq_qlora.quantizers import QuantizerConfig, load_quantized
assert "gptqmodel" not in __import__("sys").modules
qcfg = QuantizerConfig(name="gptq-4bit", method="gptq", label="PTQ-GPTQ-4bit", bits=4, group_size=32)
model = load_quantized(qcfg, {str(gptq_dir)!r}, compute_dtype="float32", for_training=False)
alive = weakref.ref(model)
del model
gc.collect()
print("ALIVE" if alive() is not None else "FREED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "FREED" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


def test_the_stage_keeps_adapters_in_bfloat16_over_gptq_as_trl_does_over_bnb(gptq_dir, tmp_path):
    """TRL casts a QLoRA adapter to bfloat16 over bitsandbytes bases only; over GPTQ it stayed float32
    (+0.33 GiB at a 7B's peak). The stage casts it, and one TRL training step runs on it."""
    from types import SimpleNamespace

    from datasets import Dataset

    from ptq_qlora import training
    from ptq_qlora.stages.qlora import trainable_quantized_model

    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=2,
                         grad_accum=1, dataloader_workers=0, gradient_checkpointing=False, padding_free=False,
                         num_processes=1, attn_implementation="sdpa", gptq_dequant_matmul=True)
    model, _ = trainable_quantized_model(GPTQ, gptq_dir, hw, TARGETS, {"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.bfloat16}
    # a fresh adapter through peft alone is float32: the cast is the stage's
    plain = attach_lora(load_quantized(GPTQ, gptq_dir, compute_dtype="float32", for_training=True), TARGETS,
                        r=4, alpha=8, dropout=0.0)
    assert {p.dtype for p in plain.parameters() if p.requires_grad} == {torch.float32}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    rows = [{"input_ids": list(range(5, 25)), "completion_mask": [0] * 10 + [1] * 10, "length": 20}] * 4
    cfg = dict(lr=1e-2, scheduler="constant", epochs=1, max_steps=2, warmup=0, weight_decay=0.0, max_grad_norm=1.0,
               optim="adamw_torch", logging_steps=1, save_steps=1000, save_total_limit=1, group_by_length=False)
    metrics = training.train_tokenized(model, byte_level_tokenizer(), Dataset.from_list(rows), cfg, hw, tmp_path,
                                       seed=0, max_length=32)
    assert all(torch.isfinite(torch.tensor(metrics["loss_curve"])))
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.bfloat16 and not torch.equal(after[n], b) for n, b in before.items())
