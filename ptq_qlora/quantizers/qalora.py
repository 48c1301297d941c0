"""`qalora`: QA-LoRA (Xu et al., 2023) in the PTQ-QLoRA pipeline.

The base is a plain GPTQ checkpoint (this method quantizes and loads exactly like `gptq`); the QLoRA
stage trains a QA-LoRA adapter on it (adapters/qalora.py) instead of LoRA, and a merge stage folds
the adapter into the zero points and writes an HQQ checkpoint of the same bit width
(quantizers/qalora_merge.py, loaded by the `hqq` method).

QA-LoRA pools the adapter's input over GPTQ's groups of contiguous input features, so the base must
keep them contiguous: no act-order, no group-aware reordering, and real groups (group_size > 0).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ptq_qlora.quantizers import gptq
from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, register

ACT_ORDER_ERROR = "QA-LoRA's merge needs desc_act=false (act-order permutes the groups)"


def check_settings(qcfg: QuantizerConfig) -> None:
    """The QA-LoRA-specific rules, each a one-line error."""
    if qcfg.desc_act:
        raise ValueError(ACT_ORDER_ERROR)
    if qcfg.act_group_aware:
        raise ValueError("QA-LoRA pools contiguous groups of inputs: set act_group_aware=false (gptqmodel's "
                         "group-aware reordering changes the column order)")
    if qcfg.group_size <= 0:
        raise ValueError(f"QA-LoRA pools the adapter input over quantization groups; group_size={qcfg.group_size} "
                         "has none (choose 32, 64 or 128)")


def _validate(qcfg: QuantizerConfig, src_dir: Path, tokenizer, calibration_texts: list[str]) -> None:
    check_settings(qcfg)
    gptq._validate(qcfg, src_dir, tokenizer, calibration_texts)


def _merge(qcfg: QuantizerConfig, base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> dict:
    from ptq_qlora.quantizers.qalora_merge import merge_qalora

    check_settings(qcfg)
    return merge_qalora(qcfg, base_dir, adapter_dir, out_dir, dtype)


def _describe(qcfg: QuantizerConfig) -> dict:
    return {**gptq._describe(qcfg), "adapter": "qa-lora", "merged_format": "hqq"}


register(QuantMethod(name="qalora", supported_bits=(2, 3, 4, 8), validate=_validate, quantize=gptq._quantize,
                     load=gptq._load, needs_calibration=True, describe=_describe, adapter="qa-lora", merge=_merge))
