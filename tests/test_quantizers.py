"""PTQ layer on a tiny random Llama (CPU): checkpoints reload in plain transformers with the logits of
the in-memory quantized model, stay near the 16-bit model, decode greedily; bad inputs fail early."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptq_qlora.quantizers import QuantizerConfig, load_quantized, quantize, quantize_with_model, validate
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.testing import build_tiny_llama, byte_level_tokenizer, random_texts
from ptq_qlora.quantizers.training_safety import disable_bnb_cpu_packing

BNB = QuantizerConfig(name="bnb-nf4", method="bnb", label="PTQ-BNB-4bit", bits=4)
GPTQ = QuantizerConfig(name="gptq-4bit", method="gptq", label="PTQ-GPTQ-4bit", bits=4, group_size=32,
                       calibration_samples=16, min_calibration_samples=8, calibration_max_tokens=64)
# Eval-only CPU kernels (bnb's packed path, gptqmodel TorchAten) round activations to bf16: 8 mantissa
# bits, ~0.4% relative per matmul; logits of the tiny model are O(0.5), so 2e-2 absolute is generous.
BF16_KERNEL_ATOL = 2e-2


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "sft")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def ids():
    return probe_input_ids(259, batch=3, length=40)


@pytest.fixture(scope="module")
def fp_logits(src, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(input_ids=ids).logits


@pytest.fixture(scope="module", params=[BNB, GPTQ], ids=["bnb", "gptq"])
def quantized(request, src, tokenizer, ids, tmp_path_factory):
    """(qcfg, out_dir, stats, logits of the in-memory model right after quantization)."""
    qcfg = request.param
    out = tmp_path_factory.mktemp(qcfg.method) / "ptq"
    stats, model = quantize_with_model(qcfg, src, out, tokenizer, random_texts(24), "float32")
    with torch.no_grad():  # the returned model runs the exact (training-safe) kernels
        logits = model.eval()(input_ids=ids).logits
    return qcfg, out, stats, logits


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_plain_transformers_reload_reproduces_in_memory_model(quantized, ids):
    qcfg, out, stats, in_memory = quantized
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # no extra arguments
    kinds = {type(m).__name__ for m in reloaded.modules()}
    assert kinds & {"Linear4bit", "TorchLinear", "TorchAtenLinear"}, kinds
    if qcfg.method == "bnb":
        disable_bnb_cpu_packing(reloaded)  # same exact kernel as the in-memory model
        assert torch.equal(_logits(reloaded, ids), in_memory)
    else:  # transformers' default GPTQ kernel on CPU is TorchAten (bf16 activations)
        assert (_logits(reloaded, ids) - in_memory).abs().max() < BF16_KERNEL_ATOL
    assert stats["reload_max_abs_logit_diff"] == 0.0


def test_training_load_is_exact_and_eval_load_is_close(quantized, ids):
    qcfg, out, _, in_memory = quantized
    assert torch.equal(_logits(load_quantized(qcfg, out, "float32", for_training=True), ids), in_memory)
    eval_logits = _logits(load_quantized(qcfg, out, "float32", for_training=False), ids)
    assert (eval_logits - in_memory).abs().max() < BF16_KERNEL_ATOL


def test_quantized_logits_stay_near_16bit_model(quantized, fp_logits):
    # Sanity only: 4-bit error on random Gaussian weights is ~10% of the logits here (bnb 0.09,
    # GPTQ 0.11), while an unrelated random model of the same shape is ~1.4 away.
    *_, in_memory = quantized
    rel = ((in_memory - fp_logits).norm() / fp_logits.norm()).item()
    assert 0 < rel < 0.3


def test_generation_config_is_greedy(quantized, ids):
    qcfg, out, *_ = quantized
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved.get("num_beams", 1) == 1
    assert not {"temperature", "top_p", "top_k"} & {k for k, v in saved.items() if v is not None}
    model = load_quantized(qcfg, out, "float32", for_training=False)
    with torch.inference_mode():
        first, second = (model.generate(input_ids=ids[:1, :8], max_new_tokens=6) for _ in range(2))
    assert torch.equal(first, second)


def test_stats_report_real_sizes(quantized):
    qcfg, out, stats, _ = quantized
    assert stats["method"] == qcfg.method and stats["label"] == qcfg.label and stats["bits"] == 4
    assert stats["quantize_seconds"] > 0
    # fp32 -> 4-bit on the linear layers; embeddings and lm_head (most of this toy) stay fp32.
    assert stats["disk_bytes_after"] < 0.5 * stats["disk_bytes_before"]
    assert stats["memory_bytes_after"] < 0.5 * stats["memory_bytes_before"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_sampling_defaults_of_the_source_are_replaced(tmp_path):
    from transformers import GenerationConfig

    from ptq_qlora.quantizers.common import write_greedy_generation_config

    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, eos_token_id=2).save_pretrained(tmp_path)
    write_greedy_generation_config(tmp_path, tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["eos_token_id"] == 2
    assert all(saved.get(k) is None for k in ("temperature", "top_p", "top_k"))


def test_none_passes_checkpoint_through(src, tokenizer, ids, fp_logits, tmp_path):
    stats = quantize(QuantizerConfig(), src, tmp_path / "none", tokenizer, [], "float32")
    assert stats["disk_bytes_after"] == stats["disk_bytes_before"]
    assert torch.equal(_logits(load_quantized(QuantizerConfig(), tmp_path / "none", "float32", False), ids), fp_logits)


# ---- bad inputs: one-line errors, raised before any output is written ----

@pytest.mark.parametrize("qcfg, error, message", [
    (QuantizerConfig(method="gptq", bits=4, group_size=128), ValueError,
     "group_size 128 does not divide layer model.layers.0.self_attn.q_proj input width 64"),
    (QuantizerConfig(method="gptq", bits=4, group_size=48), ValueError, "group_size 48 is not supported"),
    (QuantizerConfig(method="gptq", bits=4, group_size=32, min_calibration_samples=16), ValueError,
     "at least 16 calibration samples"),
    (QuantizerConfig(method="gptq", bits=5, group_size=32), ValueError, "gptq supports bits [2, 3, 4, 8], not 5"),
    (QuantizerConfig(method="bnb", bits=8), ValueError, "bnb supports bits [4], not 8"),
    (QuantizerConfig(method="bnb", bits=4, quant_type="int4"), ValueError, "quant_type 'int4'"),
    (QuantizerConfig(method="awq", bits=4), KeyError, "known: bnb, gptq, hqq, none, qalora"),
])
def test_bad_settings_fail_before_work(src, tokenizer, tmp_path, qcfg, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        quantize(qcfg, src, tmp_path / "out", tokenizer, random_texts(12), "float32")
    assert not (tmp_path / "out").exists()


def test_short_calibration_texts_do_not_count(src, tokenizer):
    qcfg = QuantizerConfig(method="gptq", bits=4, group_size=32, min_calibration_samples=4)
    with pytest.raises(ValueError, match="got 0 from 10 texts"):
        validate(qcfg, src, tokenizer, ["too short"] * 10)  # 9 tokens <= calibration_min_tokens


def test_missing_or_unfinished_source_fails(src, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        validate(BNB, tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="unfinished: no weight files"):
        validate(BNB, tmp_path / "half")


def test_output_folder_must_be_fresh(src, tokenizer, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        quantize(BNB, src, tmp_path / "out", tokenizer, [], "float32")


def test_gptq_warns_before_quantizing_when_the_fused_block_update_cannot_be_built(monkeypatch, caplog):
    """Without gptqmodel's CUDA block kernel (no nvcc) GPTQ still runs, 2-4x slower: a warning with the
    library's reason comes before the long run; on CPU nothing is tried."""
    from gptqmodel.quantization import gptq_cuda

    from ptq_qlora.quantizers.gptq import fused_block_update_ready

    calls = []
    monkeypatch.setattr(gptq_cuda, "block_update_available", lambda: calls.append(1) or False)
    monkeypatch.setattr(gptq_cuda._EXTENSION, "_last_error", "nvcc was not found", raising=False)
    assert fused_block_update_ready("cpu") is False and calls == []
    with caplog.at_level("WARNING", logger="ptq_qlora.quantizers.gptq"):
        assert fused_block_update_ready("cuda:0") is False
    assert calls == [1]
    assert "nvcc was not found" in caplog.text and "2-4x slower" in caplog.text
    monkeypatch.setattr(gptq_cuda, "block_update_available", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptq_qlora.quantizers.gptq"):
        assert fused_block_update_ready("cuda:0") is True
    assert "unavailable" not in caplog.text


def test_gptq_gpu_eval_load_falls_back_to_triton_when_auto_kernel_cannot_be_built(monkeypatch, caplog, tmp_path):
    """`auto` on a Hopper GPU picks Machete, which downloads CUTLASS to build: offline the load fails.
    The default falls back to Triton's kernel with a warning; a backend the user named still raises."""
    import transformers
    from urllib.error import URLError

    from ptq_qlora.quantizers import gptq

    tried = []

    def fake_from_pretrained(path, quantization_config, **kwargs):
        tried.append(quantization_config.backend)
        if quantization_config.backend == "auto":
            raise URLError("name resolution")
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with caplog.at_level("WARNING", logger="ptq_qlora.quantizers.gptq"):
        model = gptq._load(GPTQ, tmp_path, torch.bfloat16, for_training=False, device_map={"": "cuda:0"})
    assert isinstance(model, torch.nn.Linear) and tried == ["auto", gptq.CUDA_EVAL_FALLBACK]
    assert "URLError" in caplog.text and "gptq_triton" in caplog.text
    named = dataclasses.replace(GPTQ, backend_eval="auto")
    tried.clear()
    with pytest.raises(URLError):
        gptq._load(named, tmp_path, torch.bfloat16, for_training=False, device_map={"": "cuda:0"})
    assert tried == ["auto"]
