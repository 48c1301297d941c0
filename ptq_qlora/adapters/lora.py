"""LoRA on a frozen base model (QLoRA when the base is 4-bit), and unmerged adapter loading."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ptq_qlora.quantizers.training_safety import ensure_training_safe

log = logging.getLogger(__name__)


def _is_quantized(model: torch.nn.Module) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or any(
        hasattr(m, "qweight") or hasattr(getattr(m, "weight", None), "quant_state") for m in model.modules()
    )


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)  # peft's rule for a plain name


def attach_lora(model: torch.nn.Module, target_modules: list[str], r: int, alpha: int, dropout: float,
                gradient_checkpointing: bool = False, lora_options: dict | None = None):
    """Wrap `model` (loaded with load_quantized(..., for_training=True)) in a trainable PeftModel.

    Targets are explicit module names: peft's "all-linear" only matches nn.Linear, and gptqmodel's
    quantized layers are not nn.Linear, so it would silently skip every GPTQ layer. Every requested
    name must match at least one module, or this fails before touching the model. `lora_options`
    are extra LoraConfig fields (e.g. QA-LoRA's, see adapters/qalora.py).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of module names, got {target_modules!r} "
                         "('all-linear' does not match GPTQ layers)")
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in target_modules if not any(_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA target modules {unmatched} match no module of {type(model).__name__}")

    if _is_quantized(model):
        ensure_training_safe(model)
        # Freezes the base and, for bnb, upcasts fp16/bf16 norms/embeddings/lm_head to fp32 (QLoRA's
        # recipe for stable fp16/bf16 training; a no-op with fp32 compute on CPU). Checkpointing is the
        # hardware profile's call: on CPU it only costs time.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM", **(lora_options or {}))
    peft_model = get_peft_model(model, config)
    log.info("LoRA attached: %s", parameter_counts(peft_model))
    return peft_model


# TRL's SFTTrainer puts a QLoRA adapter in bfloat16 (the QLoRA paper's recipe), but only over a
# bitsandbytes base (`is_loaded_in_4bit`): over GPTQ it stayed float32, measured +0.33 GiB at the peak of
# a 7B's step (parameters, gradients, Adam states; benchmarks/RESULTS.md, sixth session) and another
# adapter precision than NF4's. The QLoRA stage casts over every 4-bit base, so quantizers compare alike.
ADAPTERS_CAST_BY_TRL = ("bnb",)


def adapters_in_bfloat16(peft_model: torch.nn.Module) -> int:
    """TRL's QLoRA cast for any base: trainable weights to bfloat16, DoRA's magnitude vector excepted (its
    updates can fall below bfloat16's resolution: TRL excludes it too). Returns the number cast."""
    count = 0
    for name, param in peft_model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)
            count += 1
    return count


def dequantize_frozen_base(peft_model: torch.nn.Module, dtype: torch.dtype) -> int:
    """CPU training speed: give every LoRA layer a frozen nn.Linear base holding the weights its 4-bit
    layer multiplies by, dequantized once instead of in every forward and backward (gptqmodel's CPU
    training kernel unpacks the codes each call). Same values, so the same loss and LoRA gradients
    (tests/test_lora_gradients.py); the adapter saved is unchanged and evaluation still runs the
    4-bit checkpoint. Costs a 16-bit copy of the base in memory, hence a hardware option (cpu profile).
    Returns the number of layers replaced."""
    from ptq_qlora.quantizers.common import dequantize_linear

    count = 0
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A") or not _is_quantized(base):
            continue
        linear = dequantize_linear(base).to(dtype).requires_grad_(False)
        module.base_layer = linear
        if hasattr(module, "quant_linear_module"):  # peft's GPTQ LoRA layer calls this alias
            module.quant_linear_module = linear
        count += 1
    return count


def load_adapter(base_model: torch.nn.Module, adapter_dir: str | Path):
    """Adapter over the (4-bit) base, unmerged: PEFT cannot merge into GPTQ, and into NF4 it is lossy."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def parameter_counts(model: torch.nn.Module) -> dict:
    """Trainable vs. total parameters, quantized weights counted as the logical in*out they encode."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features"):  # GPTQ: buffers, not parameters
            total += module.in_features * module.out_features
        for p in module.parameters(recurse=False):
            state = getattr(p, "quant_state", None)
            total += state.shape.numel() if state is not None else p.numel()  # bnb: packed 2 per byte
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}
