"""GPTQ layers as the frozen base under LoRA on a GPU: dequantize in the forward, again in the
backward, keep nothing in between.

gptqmodel's trainable kernels (TorchLinear, TritonV2Linear) run `x @ dequantize_weight()` through
autograd, which saves the dequantized 16-bit weight of every layer for the backward: a whole 16-bit
copy of each layer alive from its forward to its backward (the peer baseline: LoRA over GPTQ at
3.2x the memory of LoRA over bnb NF4 and 2.1x slower). The base is frozen, so the backward needs the
weight only to pass the gradient to the input; bnb's MatMul4Bit dequantizes it again there instead
of saving it. This does the same for GPTQ, with gptqmodel's own Triton dequantization kernel on CUDA
(its torch dequantization elsewhere).
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def _triton_dequant_eligible(layer) -> bool:
    """gptqmodel uses its Triton dequantization only in eval mode; the layout conditions it checks
    do not depend on the mode, so ask with the mode flag off (without .eval(), which may swap zeros)."""
    check = getattr(layer, "_can_use_triton_dequant", None)
    if check is None or getattr(layer, "_dequantize_weight_triton", None) is None:
        return False
    training = layer.training
    layer.training = False
    try:
        return bool(check())
    finally:
        layer.training = training


def dequantized_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as a dense [in_features, out_features] tensor of `dtype`."""
    if getattr(layer, "_frozen_triton_dequant", None) is None:  # decided once per layer
        layer._frozen_triton_dequant = layer.qweight.is_cuda and _triton_dequant_eligible(layer)
    with torch.no_grad():
        if layer._frozen_triton_dequant:
            # straight to `dtype` (the kernel computes in float32): gptqmodel's own helper writes the
            # scales' float16 and a cast pass over every weight followed
            from gptqmodel.nn_modules.triton_utils.dequant import dequant

            return dequant(dtype, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bits,
                           layer.pack_dtype_bits, layer.maxq)
        weight = layer.dequantize_weight()
    return weight.to(dtype)


class FrozenDequantMatmul(torch.autograd.Function):
    """y = x @ W(layer) with no weight gradient and no saved weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_dtype = x.dtype
        return x @ dequantized_weight(layer, x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = dequantized_weight(ctx.layer, grad_out.dtype)
        return (grad_out @ weight.t()).to(ctx.input_dtype), None


def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # a custom Function sees no autocast: cast as it would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    flat = x.reshape(-1, x.shape[-1])
    out = FrozenDequantMatmul.apply(flat, self).reshape(*x.shape[:-1], self.out_features)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out


def use_frozen_dequant_matmul(model: torch.nn.Module) -> int:
    """Route every gptqmodel TorchLinear-family layer (gptq_torch, gptq_triton backends) of `model`
    through FrozenDequantMatmul; returns the number of layers. Other GPTQ kernels are left alone
    (logged): they do not expose the dense dequantization this needs."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    patched, others = 0, set()
    for module in model.modules():
        if isinstance(module, TorchLinear):
            module._frozen_triton_dequant = None  # decided at the first dequantization (on its device)
            module.forward = types.MethodType(_frozen_forward, module)
            patched += 1
        elif hasattr(module, "qweight"):
            others.add(type(module).__name__)
    if others:
        log.warning("gptq_dequant_matmul: %s layers keep their own kernel (not TorchLinear-based)", sorted(others))
    return patched
