"""`bnb`: bitsandbytes 4-bit (NF4 by default, QLoRA's format; or FP4), saved as a real serialized 4-bit checkpoint.

bnb quantizes while loading; we load the 16-bit source with a BitsAndBytesConfig and save the packed
result (uint8 weights + absmax/quant_map/nested constants), so size on disk is the real 4-bit size and
the checkpoint reloads with plain `AutoModelForCausalLM.from_pretrained(out_dir)`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ptq_qlora.quantizers.common import default_device_map, dtype_bytes
from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, register
from ptq_qlora.quantizers.training_safety import disable_bnb_cpu_packing

QUANT_TYPES = ("nf4", "fp4")
# the configs' labels (conf/quantizer/bnb-*.yaml); NF4 keeps the paper's name
LABELS = {"nf4": "PTQ-BNB-4bit", "fp4": "PTQ-BNB-FP4-4bit"}


def _validate(qcfg: QuantizerConfig, src_dir: Path, tokenizer, calibration_texts: list[str]) -> None:
    import bitsandbytes  # noqa: F401  here, so its import (~1.3 s) is not counted as quantization time

    if qcfg.quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb quant_type {qcfg.quant_type!r} is not supported; choose one of {QUANT_TYPES}")
    expected = LABELS[qcfg.quant_type]
    if qcfg.label in LABELS.values() and qcfg.label != expected:  # e.g. bnb-nf4 with quant_type=fp4
        raise ValueError(f"bnb quant_type {qcfg.quant_type} would be reported as {qcfg.label!r}; use "
                         f"quantizer=bnb-{qcfg.quant_type} (label {expected!r}) or set quantizer.label")


def _bnb_config(qcfg: QuantizerConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg.quant_type,
        bnb_4bit_use_double_quant=qcfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _quantize(qcfg, src_dir: Path, out_dir: Path, tokenizer, calibration_texts, compute_dtype):
    from transformers import AutoModelForCausalLM

    # Non-quantized tensors (embeddings, norms, lm_head) are stored in compute_dtype.
    model = AutoModelForCausalLM.from_pretrained(
        str(src_dir), quantization_config=_bnb_config(qcfg, compute_dtype), dtype=compute_dtype,
        device_map=default_device_map(),
    )
    model.save_pretrained(str(out_dir))
    return model


def _load(qcfg: QuantizerConfig, path: Path, compute_dtype: torch.dtype, for_training: bool, device_map):
    from transformers import AutoModelForCausalLM

    # The quantization config stored in config.json is used; only the compute dtype is a load-time choice.
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=compute_dtype, device_map=device_map)
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(module, "quant_state"):
            # bnb Linear4bit keeps the compute dtype saved at PTQ time; follow this load's hardware profile.
            module.compute_dtype, module.compute_type_is_set = compute_dtype, True
    if for_training or not qcfg.cpu_packed_eval:
        disable_bnb_cpu_packing(model)
    return model


def use_float_quant_storage(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Re-view every packed 4-bit weight's bytes as `dtype` (bnb's `bnb_4bit_quant_storage`), for FSDP:
    FSDP2 shards floating-point parameters only (Accelerate leaves uint8 Params4bit unsharded and whole
    on every GPU) and casts what it shards to its mixed-precision dtype, which must not change the bytes.
    The bytes, the quant state and bnb's kernels (storage-agnostic) are unchanged; checkpoints keep uint8.
    Call after attaching LoRA (peft gives adapters the base weight's floating dtype). Returns layer count."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ != "Params4bit" or getattr(weight, "quant_state", None) is None:
            continue
        if weight.dtype != dtype:
            packed = weight.data.contiguous().view(torch.uint8).reshape(-1)
            if packed.numel() % dtype_bytes(dtype):
                raise ValueError(f"{packed.numel()} packed bytes do not fill whole {dtype} elements")
            weight.data = packed.view(dtype).reshape(-1, 1)  # bnb's layout: (bytes / itemsize, 1)
        weight.quant_storage = dtype
        if hasattr(module, "quant_storage"):
            module.quant_storage = dtype
        count += 1
    return count


def _describe(qcfg: QuantizerConfig) -> dict:
    return {"quant_type": qcfg.quant_type, "double_quant": qcfg.double_quant}


register(QuantMethod(name="bnb", supported_bits=(4,), validate=_validate, quantize=_quantize, load=_load,
                     describe=_describe))
