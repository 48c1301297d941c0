"""LoRA's update added to the base output in one matmul (experimental; speed not yet measured on a GPU).

peft computes `result + lora_B(lora_A(x)) * scaling`: lora_B's output, its scaled copy and the sum are
three output-sized tensors per LoRA layer in the forward (and the scaled gradient one more in the
backward). `torch.addmm(result, lora_A(x), lora_B.weight.T, alpha=scaling)` writes the sum directly
and accumulates the rank-r product in float32 before its one rounding. The same function of the same
weights: loss and LoRA gradients match peft's (tests/test_fused_lora.py). Layers with anything else
(dropout, DoRA/QA-LoRA variants, a LoRA bias, several or disabled adapters, merged weights, mixed
adapter batches) keep peft's forward.
"""
from __future__ import annotations

import types

import torch


def _plain_lora(layer, args, kwargs) -> str | None:
    """The one active adapter's name when this call is plain LoRA, else None (peft's forward then)."""
    if args or kwargs.get("adapter_names") is not None or layer.disable_adapters or layer.merged:
        return None
    if len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_lora(self, args, kwargs)
    if name is None:
        return self._unfused_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    result_dtype = result.dtype  # peft returns the base layer's dtype
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    down = lora_a(self._cast_input_dtype(x, lora_a.weight.dtype))
    up = lora_b.weight.t()
    if not torch.is_autocast_enabled(x.device.type):  # autocast casts addmm's inputs itself
        dtype = torch.promote_types(result.dtype, down.dtype)
        result, down, up = result.to(dtype), down.to(dtype), up.to(dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), up,
                      alpha=self.scaling[name])
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(result_dtype)


def fuse_lora_add(peft_model: torch.nn.Module) -> int:
    """Give every peft LoRA layer of `peft_model` the one-matmul update; returns the layer count."""
    count = 0
    for module in peft_model.modules():
        if all(hasattr(module, a) for a in ("lora_A", "lora_B", "base_layer", "scaling", "lora_variant")) \
                and not hasattr(module, "_unfused_forward"):
            module._unfused_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
