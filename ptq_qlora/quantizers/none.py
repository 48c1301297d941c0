"""`none`: the SFT-16bit point. The checkpoint passes through unchanged (hard-linked where possible)."""
from __future__ import annotations

from pathlib import Path

import torch

from ptq_qlora.quantizers.common import link_or_copy, weight_files
from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, register


def _validate(qcfg: QuantizerConfig, src_dir: Path, tokenizer, calibration_texts: list[str]) -> None:
    pass


def _load(qcfg: QuantizerConfig, path: Path, compute_dtype: torch.dtype, for_training: bool, device_map):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=compute_dtype, device_map=device_map)


def _quantize(qcfg, src_dir: Path, out_dir: Path, tokenizer, calibration_texts, compute_dtype):
    # Weights keep the source dtype on disk; compute_dtype applies when the model is loaded.
    for src in weight_files(src_dir) + sorted(Path(src_dir).glob("*.index.json")) + [Path(src_dir) / "config.json"]:
        link_or_copy(src, Path(out_dir) / src.name)
    return _load(qcfg, out_dir, compute_dtype, False, None)


register(QuantMethod(name="none", supported_bits=(16, 32), validate=_validate, quantize=_quantize, load=_load))
