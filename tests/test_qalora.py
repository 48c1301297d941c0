"""QA-LoRA on tiny-random (CPU): the merge into HQQ float zero points is exact for 2/3/4/8 bits, the
merged checkpoint is the PTQ checkpoint's size up to per-group metadata, act-order is refused, and
`quantizer=qa-lora` composes and runs the whole pipeline.

Tolerances.
- Logits: merged vs unmerged (gptqmodel's exact training kernel + peft's QA-LoRA forward), both
  float32, max |diff| / max |logit| <= 1e-3 (the issue's bar). Measured ~2e-4 for 3/4/8 bits and ~4e-7
  for 2 bits: gptqmodel multiplies scale * (q - z) in float16 (the scales' dtype), so its weights carry
  float16 rounding that the float32 HQQ dequantization does not (at 2 bits every product is exact).
- Layers: each HQQ layer's dequantized weight equals s * (q - z) + c in float64 within 1e-6 relative
  (float32 storage of scale and zero).
- Size: low-bit codes and the other tensors have the PTQ checkpoint's exact byte counts (3 bits: HQQ packs
  10 codes per int32, 32/30 of GPTQ's); only per-group metadata differs, by an amount computed from the
  layer shapes (a float zero in the compute dtype instead of GPTQ's packed integer zero + g_idx), and the
  container (hqq's pickle vs safetensors' header) by < 16 KiB: about 0.6 KB per quantized layer for hqq's
  per-layer settings, whatever the weights' size (~6 KiB here; 131 KiB for the 224 layers of a 7B shape).
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ptq_qlora.adapters.qalora import attach_qalora, group_constants
from ptq_qlora.quantizers import QuantizerConfig, get_method, load_quantized, quantize, validate
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.qalora_merge import (
    MERGE_TOLERANCE, checkpoint_breakdown, gptq_codes, is_gptq_linear, merge_qalora, relative_logit_diff,
)
from ptq_qlora.quantizers.testing import build_tiny_llama, byte_level_tokenizer, random_texts
from ptq_qlora.stages.runner import run_job

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 32
CONTAINER_SLACK = 16 * 1024


def qalora_config(bits: int, **overrides) -> QuantizerConfig:
    settings = dict(name="qa-lora", method="qalora", label=f"PTQ-GPTQ-{bits}bit", bits=bits, group_size=GROUP,
                    calibration_samples=16, min_calibration_samples=8, calibration_max_tokens=64)
    return QuantizerConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("qalora") / "sft")


@pytest.fixture(scope="module")
def trained(src):
    """Per bit width: (PTQ dir, adapter dir) with a QA-LoRA adapter of realistic, nonzero weights."""
    made = {}

    def make(bits: int):
        if bits not in made:
            qcfg = qalora_config(bits)
            ptq = src.parent / f"ptq{bits}"
            quantize(qcfg, src, ptq, byte_level_tokenizer(), random_texts(24), "float32")
            model = attach_qalora(load_quantized(qcfg, ptq, "float32", True), TARGETS, r=4, alpha=8, dropout=0.0,
                                  group_size=GROUP)
            gen = torch.Generator().manual_seed(bits)
            with torch.no_grad():  # B starts at zero; give both factors values (c/s spans several steps)
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            model.save_pretrained(str(src.parent / f"adapter{bits}"))
            made[bits] = (ptq, src.parent / f"adapter{bits}")
        return made[bits]

    return make


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_merge_is_exact_and_low_bit(trained, tmp_path, bits):
    from ptq_qlora.adapters import load_adapter

    qcfg = qalora_config(bits)
    ptq, adapter = trained(bits)
    stats = merge_qalora(qcfg, ptq, adapter, tmp_path / "merged", torch.float32)

    ids = probe_input_ids(259, batch=2, length=24)  # not the merge's own probe
    unmerged = load_adapter(load_quantized(qcfg, ptq, "float32", True), adapter)
    merged = get_method("hqq").load(qcfg, tmp_path / "merged", torch.float32, False, "cpu")
    expected, got = logits(unmerged, ids), logits(merged, ids)
    error = relative_logit_diff(got, expected)
    assert error <= MERGE_TOLERANCE and stats["float32_rel_logit_diff"] <= MERGE_TOLERANCE, (error, stats)
    # the adapter matters: without it the logits are far off, so the identity is not trivially met
    with unmerged.disable_adapter():
        base_only = logits(unmerged, ids)
    assert relative_logit_diff(base_only, expected) > 20 * max(error, 1e-4)

    # layer by layer: HQQ dequantizes to s * (q - z) + c, c the adapter's group constant
    lora = {n.removeprefix("base_model.model."): m for n, m in unmerged.named_modules() if hasattr(m, "lora_A")}
    layers = {n.removesuffix(".base_layer"): m for n, m in unmerged.get_base_model().named_modules()
              if is_gptq_linear(m)}
    assert set(lora) == set(layers) and len(layers) == 14
    for name, module in layers.items():
        q, z, s, g = gptq_codes(module)
        want = s.double().repeat_interleave(g, dim=1) * (q - z.repeat_interleave(g, dim=1)).double()
        want += group_constants(lora[name]).repeat_interleave(g, dim=1)
        have = merged.get_submodule(name).dequantize().double()
        assert type(merged.get_submodule(name)).__name__ == "HQQLinear"
        assert ((have - want).abs().max() / want.abs().max()).item() < 1e-6, name

    # size: same codes and other tensors as the PTQ checkpoint, metadata as the formats say
    ptq_sizes, merged_sizes = checkpoint_breakdown(ptq), checkpoint_breakdown(tmp_path / "merged")
    assert merged_sizes["other"] == ptq_sizes["other"]
    shapes = [(m.out_features, m.in_features) for m in layers.values()]
    groups = sum(o * i // GROUP for o, i in shapes)
    if bits == 3:
        assert merged_sizes["codes"] == sum(-(-(o * i // GROUP) // 10) * GROUP * 4 for o, i in shapes)
        assert merged_sizes["codes"] >= ptq_sizes["codes"] * 32 / 30  # 10 codes per word, rows padded to 10
    else:
        assert merged_sizes["codes"] == ptq_sizes["codes"]
    assert ptq_sizes["group_meta"] == groups * (2 + bits / 8) + 4 * sum(i for _, i in shapes)  # fp16 s, int z, g_idx
    assert merged_sizes["group_meta"] == groups * 2 * 4  # float32 scale and zero
    payload = {k: merged_sizes[k] - ptq_sizes[k] for k in ("codes", "group_meta", "other")}
    container = (merged_sizes["file_bytes"] - ptq_sizes["file_bytes"]) - sum(payload.values())
    assert abs(container) < CONTAINER_SLACK, (container, merged_sizes, ptq_sizes)
    assert stats["merged_disk_bytes"] == merged_sizes["file_bytes"]


def test_act_order_is_refused(src, trained):
    with pytest.raises(ValueError, match=r"desc_act=false \(act-order permutes the groups\)"):
        validate(qalora_config(4, desc_act=True), src, byte_level_tokenizer(), random_texts(24))
    with pytest.raises(ValueError, match="act_group_aware=false"):
        validate(qalora_config(4, act_group_aware=True), src, byte_level_tokenizer(), random_texts(24))
    with pytest.raises(ValueError, match="group_size=-1"):
        validate(qalora_config(4, group_size=-1), src, byte_level_tokenizer(), random_texts(24))
    # the merge re-checks the checkpoint itself: permuted groups (what act-order writes) are refused
    ptq, _ = trained(4)
    layer = next(m for m in load_quantized(qalora_config(4), ptq, "float32", True).modules() if is_gptq_linear(m))
    layer.g_idx = layer.g_idx.flip(0)
    with pytest.raises(ValueError, match="desc_act=false"):
        gptq_codes(layer)


def test_act_order_fails_the_job_before_sft(compose_cfg):
    with pytest.raises(ValueError, match="desc_act=false"):
        run_job(compose_cfg(*TINY, "stage=pipeline", "quantizer=qa-lora", "quantizer.desc_act=true"))
    assert not list(Path(compose_cfg().paths.store).glob("*sft-*"))


def test_qa_lora_composes(compose_cfg):
    cfg = compose_cfg("model=tiny-random", "quantizer=qa-lora", "quantizer.bits=3")
    assert (cfg.quantizer.method, cfg.quantizer.bits, cfg.quantizer.group_size, cfg.quantizer.desc_act) == \
        ("qalora", 3, 32, False)
    assert cfg.quantizer.label == "PTQ-GPTQ-3bit"
    assert compose_cfg("quantizer=qa-lora").quantizer.group_size == 64  # smollm2-135m's widths
    method = get_method("qalora")
    assert method.adapter == "qa-lora" and method.merge is not None and get_method("gptq").merge is None


def test_hqq_quantizer_round_trips(src, tmp_path):
    """The `hqq` method as a PTQ method of its own (data-free): the checkpoint reloads to the same logits."""
    qcfg = QuantizerConfig(name="hqq-4bit", method="hqq", label="PTQ-HQQ-4bit", bits=4, group_size=GROUP)
    stats = quantize(qcfg, src, tmp_path / "hqq", byte_level_tokenizer(), [], "float32")
    assert stats["reload_max_abs_logit_diff"] == 0.0 and stats["disk_bytes_after"] < stats["disk_bytes_before"]


def test_pipeline_with_qa_lora(compose_cfg):
    store = Path(compose_cfg().paths.store)
    # one SFT epoch and no SFT evaluation: the QA-LoRA points are what this test is about
    summary = run_job(compose_cfg(*TINY, "task=bitext", "stage=pipeline", "quantizer=qa-lora", "sft.epochs=1",
                                  "stage.eval_points=[ptq,qlora]"))
    assert list(summary["results"]) == ["PTQ-GPTQ-4bit", "PTQ-GPTQ-4bit+QA-LoRA", "QA-LoRA-merged-4bit"]
    for metrics in summary["results"].values():
        assert metrics["n_examples"] == 12 and 0 <= metrics["f1_micro"] <= 1
    stages = summary["stages"]
    qlora = json.loads((store / f"qlora-{stages['qlora']['lineage']}" / "metrics.json").read_text())
    assert qlora["last_logged_loss"] < qlora["first_logged_loss"], qlora["loss_curve"]
    adapter = json.loads((store / f"qlora-{stages['qlora']['lineage']}" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_qalora"] and adapter["qalora_group_size"] == 32
    merge_dir = store / f"merge-{stages['merge']['lineage']}"
    assert (merge_dir / "completed").exists() and (merge_dir / "model" / "qmodel.pt").exists()
    merge = json.loads((merge_dir / "metrics.json").read_text())
    assert merge["float32_rel_logit_diff"] <= MERGE_TOLERANCE and merge["dtype"] == "bfloat16"
    assert stages["merge"]["quantizer"]["method"] == "hqq"
    assert not list((merge_dir / "model").glob("*.safetensors"))  # no 16-bit copy beside the HQQ weights
    # a 16-bit merged model would be ~4x the PTQ one; this one is within its metadata of it
    assert 0.9 < merge["merged_over_ptq"] < 1.2, merge
