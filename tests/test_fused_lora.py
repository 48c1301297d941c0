"""fuse_lora_layers (hardware.fused_lora): base matmul and LoRA as one autograd function give peft's loss
and LoRA gradients (float32 on CPU, over a plain and a 4-bit base), keep no dense base weight for the
backward, and layers it cannot handle keep peft's forward."""
import pytest
import torch

from ptq_qlora.adapters import attach_lora
from ptq_qlora.adapters.fused_lora import fuse_lora_layers
from ptq_qlora.quantizers import QuantizerConfig, load_quantized, quantize
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.testing import build_tiny_llama, byte_level_tokenizer, lora_gradients, relative_gradient_error

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BNB = QuantizerConfig(name="bnb-nf4", method="bnb", label="PTQ-BNB-4bit", bits=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    src = build_tiny_llama(root / "sft")
    quantize(BNB, src, root / "bnb", byte_level_tokenizer(), [], "float32")
    return root


def _model(folders, base: str, dropout: float = 0.0):
    from transformers import AutoModelForCausalLM

    if base == "bnb":
        model = load_quantized(BNB, folders / "bnb", compute_dtype="float32", for_training=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folders / "sft"), dtype=torch.float32)
    torch.manual_seed(0)
    model = attach_lora(model, TARGETS, r=4, alpha=8, dropout=dropout)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("base", ["plain", "bnb"])
def test_fused_add_gives_peft_loss_and_gradients(folders, base):
    batch = probe_input_ids(259, batch=2, length=24)
    peft_loss, peft_grads = lora_gradients(_model(folders, base), batch)
    fused = _model(folders, base)
    assert fuse_lora_layers(fused) == 7 * fused.config.num_hidden_layers
    loss, grads = lora_gradients(fused, batch)
    assert abs(loss - peft_loss) <= 1e-6 * abs(peft_loss)
    total, worst = relative_gradient_error(grads, peft_grads)
    assert total < 1e-5 and worst < 1e-4, (total, worst)


def test_layers_with_dropout_or_disabled_adapters_keep_peft_forward(folders):
    batch = probe_input_ids(259, batch=2, length=24)
    peft_model, fused = _model(folders, "plain", dropout=0.1), _model(folders, "plain", dropout=0.1)
    fuse_lora_layers(fused)
    torch.manual_seed(1)
    expected = peft_model(input_ids=batch).logits
    torch.manual_seed(1)
    torch.testing.assert_close(fused(input_ids=batch).logits, expected)  # same dropout draws: peft's path
    with fused.disable_adapter():
        torch.testing.assert_close(fused(input_ids=batch).logits,
                                   fused.get_base_model()(input_ids=batch).logits)


def test_fused_layers_keep_no_dense_base_weight(folders):
    batch = probe_input_ids(259, batch=2, length=24)
    fused = _model(folders, "bnb")
    fuse_lora_layers(fused)
    shapes = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.add(tuple(t.shape)) or t, lambda t: t):
        lora_gradients(fused, batch)
    bases = [m.base_layer for m in fused.modules() if hasattr(m, "_fused_base_kind")]
    weights = {(b.out_features, b.in_features) for b in bases} | {(b.in_features, b.out_features) for b in bases}
    assert not shapes & weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # the GPU profiles' and the T4's
def test_fused_under_autocast_stays_within_rounding_of_peft(folders, dtype):
    batch = probe_input_ids(259, batch=2, length=24)
    with torch.autocast("cpu", dtype=dtype):
        peft_loss, peft_grads = lora_gradients(_model(folders, "plain"), batch)
        fused = _model(folders, "plain")
        fuse_lora_layers(fused)
        loss, grads = lora_gradients(fused, batch)
    assert abs(loss - peft_loss) <= 1e-2 * abs(peft_loss)
    total, _ = relative_gradient_error(grads, peft_grads)
    assert total < 5e-2, total
    assert all(g.dtype == torch.float32 for g in grads.values())  # LoRA weights keep float32 gradients


def test_siblings_share_one_node_per_input(folders, monkeypatch):
    """q/k/v and gate/up run as one LoraGroup per forward (not one per member); a member called
    alone, or twice with the same input, still gets its own right output."""
    from ptq_qlora.adapters import fused_lora

    batch = probe_input_ids(259, batch=2, length=24)
    fused = _model(folders, "plain")
    fuse_lora_layers(fused)
    calls = []
    original = fused_lora.LoraGroup.apply
    monkeypatch.setattr(fused_lora.LoraGroup, "apply", lambda *a: calls.append(len(a[1][0])) or original(*a))
    fused(input_ids=batch)
    layers = fused.config.num_hidden_layers  # per layer: q/k/v, gate/up, and o_proj, down_proj alone
    assert sorted(calls) == sorted([3, 2, 1, 1] * layers)
    attention = fused.get_base_model().model.layers[0].self_attn
    x = torch.randn(3, attention.k_proj.in_features)
    expected = attention.k_proj._unfused_forward(x)
    torch.testing.assert_close(attention.k_proj(x), expected)
    torch.testing.assert_close(attention.k_proj(x), expected)  # taken once already: recomputed, not stale


def test_compiled_decoder_layers_keep_the_fused_gradients(folders):
    """hardware.compile_layers (experimental): torch.compile of each decoder block around the fused
    LoRA functions gives the same loss and LoRA gradients (float32, CPU)."""
    from ptq_qlora.stages.qlora import compile_decoder_layers

    batch = probe_input_ids(259, batch=2, length=24)
    eager = _model(folders, "plain")
    fuse_lora_layers(eager)
    expected_loss, expected = lora_gradients(eager, batch)
    compiled = _model(folders, "plain")
    fuse_lora_layers(compiled)
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    for _ in range(2):  # the compiled step, then again from its cache
        loss, grads = lora_gradients(compiled, batch)
        assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
        total, worst = relative_gradient_error(grads, expected)
        assert total < 1e-4 and worst < 1e-3, (total, worst)


@pytest.mark.parametrize("base", ["plain", "bnb"])
def test_kept_recomputed_weights_save_one_dequantization_and_change_nothing(folders, base, monkeypatch):
    """keep_recomputed_weights under the offloaded checkpoint: a step dequantizes each base twice
    (forward, recomputation) instead of three times (and the backward's again), with bit-identical loss
    and LoRA gradients; outside a recomputation (no checkpointing) nothing is kept."""
    from ptq_qlora.activation_offload import install_offloaded_checkpointing
    from ptq_qlora.adapters import fused_lora

    batch = probe_input_ids(259, batch=2, length=24)
    calls = []
    original = fused_lora.weight_in_out
    monkeypatch.setattr(fused_lora, "weight_in_out", lambda *a: calls.append(1) or original(*a))

    def run(keep: bool, checkpointed: bool = True):
        model = _model(folders, base)
        fuse_lora_layers(model, keep_recomputed_weights=keep)
        if checkpointed:
            model.activation_checkpointing_enable({"use_reentrant": False})
            install_offloaded_checkpointing(model)
        calls.clear()
        shapes = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.add(tuple(t.shape)) or t, lambda t: t):
            result = lora_gradients(model, batch)
        bases = [m.base_layer for m in model.modules() if hasattr(m, "_fused_base_kind")]
        return result, len(calls), len(bases), shapes, {(b.in_features, b.out_features) for b in bases}

    (loss, grads), dequantized, layers, _, _ = run(keep=False)
    assert dequantized == 3 * layers
    (kept_loss, kept_grads), kept_dequantized, _, kept_shapes, weights = run(keep=True)
    assert kept_dequantized == 2 * layers
    assert kept_shapes & weights  # the recomputation did save them
    assert kept_loss == loss
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad), name
    _, plain_dequantized, _, plain_shapes, _ = run(keep=True, checkpointed=False)
    assert plain_dequantized == 2 * layers and not plain_shapes & weights
