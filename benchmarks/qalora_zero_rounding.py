"""What a QA-LoRA merge into GPTQ's *integer* zero points would cost, on tiny-random (CPU, ~30 s).

For each bit width: GPTQ-quantize the tiny model (group 32), give a QA-LoRA adapter random factors
(N(0, 0.05), as tests/test_qalora.py does), fold it into float zero points (what the project writes)
and into zero points rounded to the nearest integer in [0, 2^b - 1] (what GPTQ's format could hold),
and compare both with the unmerged base + adapter in float32 on a 4 x 64-token probe. Prints one JSON
line per width: the mean adapter shift |z - z'| in quantization steps, the relative logit error and loss
delta of each merge, and the adapter's own effect (base alone vs base + adapter).

    python benchmarks/qalora_zero_rounding.py
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ptq_qlora.adapters import load_adapter
from ptq_qlora.adapters.qalora import attach_qalora
from ptq_qlora.quantizers import QuantizerConfig, load_quantized, quantize
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.qalora_merge import fold_adapter, install_hqq, relative_logit_diff
from ptq_qlora.quantizers.testing import build_tiny_llama, byte_level_tokenizer, random_texts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 32


def measure(root: Path, src: Path, bits: int, ids: torch.Tensor) -> dict:
    qcfg = QuantizerConfig(name="qa-lora", method="qalora", bits=bits, group_size=GROUP, calibration_samples=16,
                           min_calibration_samples=8, calibration_max_tokens=64)
    ptq, adapter = root / f"ptq{bits}", root / f"adapter{bits}"
    quantize(qcfg, src, ptq, byte_level_tokenizer(), random_texts(24), "float32")
    model = attach_qalora(load_quantized(qcfg, ptq, "float32", True), TARGETS, r=4, alpha=8, dropout=0.0,
                          group_size=GROUP)
    gen = torch.Generator().manual_seed(bits)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(adapter))
    unmerged = load_adapter(load_quantized(qcfg, ptq, "float32", True), adapter)
    with torch.no_grad():
        reference = unmerged(input_ids=ids, labels=ids)
        with unmerged.disable_adapter():
            base = unmerged(input_ids=ids, labels=ids)
    plain, codes = fold_adapter(unmerged)
    gptq_zero = 2 ** (bits - 1)  # symmetric GPTQ
    shift = torch.cat([(gptq_zero - c["zero"]).abs().flatten() for c in codes.values()]).mean().item()
    row = {"bits": bits, "mean_adapter_shift_steps": round(shift, 4),
           "adapter_effect_rel_logit_diff": relative_logit_diff(base.logits, reference.logits)}
    for kind, rounded in (("float_zero", False), ("integer_zero", True)):
        merged_codes = {k: {**c, "zero": c["zero"].round().clamp(0, 2**bits - 1) if rounded else c["zero"]}
                        for k, c in codes.items()}
        with torch.no_grad():
            out = install_hqq(plain, merged_codes, torch.float32)(input_ids=ids, labels=ids)
        row[kind] = {"rel_logit_diff": relative_logit_diff(out.logits, reference.logits),
                     "loss_delta": out.loss.item() - reference.loss.item()}
    return row


def main() -> None:
    ids = probe_input_ids(259, batch=4, length=64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = build_tiny_llama(root / "sft")
        for bits in (2, 3, 4, 8):
            print(json.dumps(measure(root, src, bits, ids)), flush=True)


if __name__ == "__main__":
    main()
