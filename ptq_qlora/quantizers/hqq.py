"""`hqq`: HQQ checkpoints (mobiusml/hqq), the format of merged QA-LoRA models.

HQQ dequantizes group-wise with a *float* zero point, W = (W_q - zero) * scale, for 1-8 bits, which is
what an exact QA-LoRA merge needs (quantizers/qalora_merge.py). The checkpoint is hqq's own:
`config.json` + `qmodel.pt` (per-module state dicts: packed W_q, scale, zero, ...), written by
`AutoHQQHFModel.save_quantized` and loaded by `AutoHQQHFModel.from_quantized`, which runs HQQ's
kernels (HQQLinear: unpack + dequantize + matmul; on CUDA also its torchao int4 / gemlite backends).
transformers 5.x cannot load it (`HqqConfig` pre-quantized loading raises "QuantizationMethod.HQQ is
not available yet"), hence hqq's own loader.

HQQ keeps scale and zero in the compute dtype it dequantizes in, so a checkpoint has one dtype: the
one it was written with (config.json `dtype`).

As a PTQ method of its own this is data-free HQQ quantization (hqq's half-quadratic optimizer).
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, register

log = logging.getLogger(__name__)
WEIGHTS_FILE = "qmodel.pt"  # hqq's name (BaseHQQModel.get_weight_file)
BITS = (1, 2, 3, 4, 8)


def _validate(qcfg: QuantizerConfig, src_dir: Path, tokenizer, calibration_texts: list[str]) -> None:
    import hqq  # noqa: F401  fail here, before any work, if it is missing

    from ptq_qlora.quantizers.gptq import quantized_linear_widths

    if qcfg.group_size != -1:
        for name, width in quantized_linear_widths(src_dir).items():
            if width % qcfg.group_size:
                raise ValueError(f"HQQ group_size {qcfg.group_size} does not divide layer {name} input width {width}")


@contextmanager
def quick_gc():
    """hqq calls gc.collect() after each patching pass; in a large process (a test session, a job
    holding a model) each full collection takes ~0.7 s. Objects that exist before the call are frozen
    out of those collections, which then only scan what hqq itself allocates."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def device_of(device_map) -> str:
    return str(next(iter(device_map.values()))) if isinstance(device_map, dict) else str(device_map or "cpu")


def save_hqq(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """Write `model` (HQQLinear layers + plain modules in `dtype`) with hqq's serializer."""
    from hqq.models.hf.base import AutoHQQHFModel

    if hasattr(model.config, "quantization_config"):  # e.g. the GPTQ config of the model it came from
        del model.config.quantization_config
    model.config.dtype = dtype
    AutoHQQHFModel.setup_model(model)  # module names and linear tags, as hqq's quantize_model sets them
    AutoHQQHFModel.save_quantized(model, str(out_dir))


def checkpoint_dtype(path: Path) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(str(path)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}/config.json names no dtype; it is not an HQQ checkpoint written by this project")
    return dtype


def _quantize(qcfg, src_dir: Path, out_dir: Path, tokenizer, calibration_texts, compute_dtype):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    from ptq_qlora.quantizers.common import default_device_map

    device = device_of(default_device_map())
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=compute_dtype)
    group_size = None if qcfg.group_size == -1 else qcfg.group_size
    with quick_gc():
        AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=qcfg.bits, group_size=group_size,
                                      axis=1), compute_dtype=compute_dtype, device=device)
    save_hqq(model, out_dir, compute_dtype)
    return model


def _load(qcfg: QuantizerConfig, path: Path, compute_dtype: torch.dtype, for_training: bool, device_map):
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import GenerationConfig

    stored = checkpoint_dtype(path)
    if stored != compute_dtype:
        log.warning("HQQ checkpoint %s computes in %s (its scale/zero dtype), not the requested %s", path, stored,
                    compute_dtype)
    with quick_gc():
        model = AutoHQQHFModel.from_quantized(str(path), compute_dtype=stored, device=device_of(device_map))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # hqq loads each module's tensors separately
    if (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _describe(qcfg: QuantizerConfig) -> dict:
    return {"group_size": qcfg.group_size, "format": "hqq", "axis": 1}


register(QuantMethod(name="hqq", supported_bits=BITS, validate=_validate, quantize=_quantize, load=_load,
                     describe=_describe))
