"""Public entry points of the PTQ layer: validate, quantize (+ write a loadable checkpoint), load."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ptq_qlora.quantizers.common import (
    check_source_dir, checkpoint_param_count, default_device_map, disk_bytes, dtype_bytes,
    model_memory_bytes, parse_dtype, prepare_out_dir, write_greedy_generation_config,
)
from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, get_method
from ptq_qlora.quantizers.training_safety import disable_bnb_cpu_packing

log = logging.getLogger(__name__)
RELOAD_TOLERANCE = 1e-5  # max |logit difference|, relative to max |logit|; same kernel and dtype => ~0


def validate(qcfg: QuantizerConfig, src_dir: str | Path, tokenizer: Any = None,
             calibration_texts: Sequence[str] = ()) -> QuantMethod:
    """Every check that can fail, before any long work; each failure is a one-line error."""
    method = get_method(qcfg.method)
    if qcfg.bits not in method.supported_bits:
        raise ValueError(f"{method.name} supports bits {list(method.supported_bits)}, not {qcfg.bits}")
    check_source_dir(Path(src_dir))
    method.validate(qcfg, Path(src_dir), tokenizer, list(calibration_texts))
    return method


def quantize_with_model(qcfg: QuantizerConfig, src_dir: str | Path, out_dir: str | Path, tokenizer: Any,
                        calibration_texts: Sequence[str], compute_dtype: str | torch.dtype
                        ) -> tuple[dict, torch.nn.Module]:
    """`quantize`, also returning the in-memory quantized model (made training-safe, see verify)."""
    method = validate(qcfg, src_dir, tokenizer, calibration_texts)
    src_dir, dtype = Path(src_dir), parse_dtype(compute_dtype)
    out_dir = prepare_out_dir(Path(out_dir))

    start = time.perf_counter()
    model = method.quantize(qcfg, src_dir, out_dir, tokenizer, list(calibration_texts), dtype)
    seconds = time.perf_counter() - start

    tokenizer = tokenizer if tokenizer is not None else _tokenizer_from(src_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    write_greedy_generation_config(out_dir, src_dir)

    params = checkpoint_param_count(src_dir)
    stats = {
        "method": method.name, "label": qcfg.label, "bits": qcfg.bits, "compute_dtype": str(dtype).removeprefix("torch."),
        "quantize_seconds": round(seconds, 3),
        "disk_bytes_before": disk_bytes(src_dir), "disk_bytes_after": disk_bytes(out_dir),
        # 16-bit model held in compute_dtype vs. the quantized model as it sits in memory.
        "memory_bytes_before": params * dtype_bytes(dtype) if params else None,
        "memory_bytes_after": model_memory_bytes(model),
    }
    stats.update(method.describe(qcfg))
    if method.needs_calibration:
        stats["calibration_texts_given"] = len(calibration_texts)
    if qcfg.verify_reload:
        stats["reload_max_abs_logit_diff"] = verify_reload(qcfg, model, out_dir, dtype)
    log.info("quantized %s -> %s: %s", src_dir, out_dir, stats)
    return stats, model


def quantize(qcfg: QuantizerConfig, src_dir: str | Path, out_dir: str | Path, tokenizer: Any,
             calibration_texts: Sequence[str], compute_dtype: str | torch.dtype) -> dict:
    """Quantize the checkpoint in `src_dir` into `out_dir` (weights, config, tokenizer, greedy
    generation config), loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`. Returns stats."""
    stats, _ = quantize_with_model(qcfg, src_dir, out_dir, tokenizer, calibration_texts, compute_dtype)
    return stats


def load_quantized(qcfg: QuantizerConfig, path: str | Path, compute_dtype: str | torch.dtype,
                   for_training: bool, device_map: Any = None) -> torch.nn.Module:
    """Load a checkpoint written by `quantize`. `for_training=True` selects kernels whose backward is
    exact (no bnb CPU repacking, GPTQ `gptq_torch` on CPU); use it for QLoRA, and for any evaluation
    that runs on the same model object before or between training steps."""
    method = get_method(qcfg.method)
    model = method.load(qcfg, Path(path), parse_dtype(compute_dtype), for_training, device_map or default_device_map())
    model.eval()
    return model


def verify_reload(qcfg: QuantizerConfig, model: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> float:
    """Reload `out_dir` and require the in-memory model's logits. Both run training-safe kernels
    (exact dequantize + matmul), so a difference means the checkpoint is not what was quantized."""
    disable_bnb_cpu_packing(model)
    reloaded = load_quantized(qcfg, out_dir, dtype, for_training=True)
    ids = probe_input_ids(model.config.vocab_size).to(model.device)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits.float()
        got = reloaded(input_ids=ids.to(reloaded.device)).logits.float().to(expected.device)
    diff = (got - expected).abs().max().item()
    if diff > RELOAD_TOLERANCE * max(expected.abs().max().item(), 1.0):
        raise RuntimeError(f"checkpoint in {out_dir} does not reproduce the quantized model: max |logit diff| {diff:.3g}")
    del reloaded
    return diff


def probe_input_ids(vocab_size: int, batch: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def _tokenizer_from(src_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src_dir))
    except (OSError, ValueError):
        log.warning("no tokenizer in %s; the quantized checkpoint will have none", src_dir)
        return None
