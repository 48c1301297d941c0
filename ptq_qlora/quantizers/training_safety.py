"""Guard against silently wrong LoRA gradients through a 4-bit base on CPU (DESIGN.md, "Known traps").

Root cause (reproduced on this AVX512-BF16 CPU; numbers in tests/test_lora_gradients.py):

* bitsandbytes `Linear4bit.forward`: in eval mode with an input that does not require grad (any
  `no_grad`/`inference_mode` pass, e.g. generate or a Trainer eval loop) it rewrites the layer's
  weight *in place* into a CPU-blocked layout (`quant_state.packing_format_for_cpu = True`, absmax
  cast to bf16). From then on every forward, training ones included, runs `bitsandbytes::gemv_4bit`,
  a bf16 kernel with no autograd formula: the gradient w.r.t. the layer input is dropped (PyTorch
  only warns "autograd kernel was not registered ... silently incorrect"). LoRA grads of every
  earlier layer lose the path through the base weights (relative error ~0.4 on the tiny model).
* gptqmodel `TorchAtenLinear`: the first forward decides the layer's mode for good. An eval forward
  without grad repacks `qweight` for `aten::_weight_int4pack_mm_for_cpu` and sets
  `linear_mode = "inference"`; later forwards use that op under `@torch.no_grad`, so again no
  gradient reaches the input (same ~0.4 error). TorchFusedLinear follows the same pattern and
  TorchInt8Linear declares SUPPORTS_TRAINING = False. `TorchLinear` (backend gptq_torch) dequantizes
  on every forward and keeps no such state: it is the CPU training kernel.

Both conversions are one-way (bnb's inverse re-derives absmax from bf16), so the fix is prevention:
training loads disable bnb's packing and never use TorchAten; `ensure_training_safe` refuses a model
on which a conversion already happened.
"""
from __future__ import annotations

import torch


def _is_bnb_4bit(module: torch.nn.Module) -> bool:
    return hasattr(module, "support_avx512bf16_for_cpu") and hasattr(getattr(module, "weight", None), "quant_state")


def disable_bnb_cpu_packing(model: torch.nn.Module) -> int:
    """Stop bnb Linear4bit layers from switching to the inference-only CPU layout; returns layer count."""
    count = 0
    for module in model.modules():
        if _is_bnb_4bit(module):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def training_hazards(model: torch.nn.Module) -> list[str]:
    """Names of quantized layers whose forward would not pass gradients to their input."""
    hazards = []
    for name, module in model.named_modules():
        if _is_bnb_4bit(module):
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                hazards.append(f"{name} (bitsandbytes weight already repacked for CPU inference)")
            elif module.support_avx512bf16_for_cpu:
                hazards.append(f"{name} (bitsandbytes CPU inference packing still enabled)")
        elif hasattr(module, "qweight") and (hasattr(module, "linear_mode")
                                             or getattr(type(module), "SUPPORTS_TRAINING", True) is False):
            # gptqmodel kernels whose first forward picks a no-grad fused path for good
            # (TorchAten, TorchFused: `linear_mode`), or that declare they cannot train (TorchInt8).
            hazards.append(f"{name} (gptqmodel {type(module).__name__} kernel, not trainable after inference)")
    return hazards


def ensure_training_safe(model: torch.nn.Module) -> None:
    """Make a freshly loaded 4-bit model safe for LoRA training, or fail loudly if it cannot be."""
    disable_bnb_cpu_packing(model)
    hazards = training_hazards(model)
    if hazards:
        raise RuntimeError(
            f"{len(hazards)} quantized layers would silently drop gradients, e.g. {hazards[0]}; load the "
            "model with load_quantized(..., for_training=True) and train before any inference pass on it"
        )
