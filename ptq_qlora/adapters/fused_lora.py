"""A LoRA layer over a frozen (4-bit or 16-bit) base as one autograd function (hardware.fused_lora).

peft computes `base(x) + lora_B(lora_A(x)) * scaling` through autograd: per layer and step that is an
output-sized product, its scaled copy and the sum in the forward (twice, with the checkpoint's
recomputation), and in the backward the scaling's gradient, an input-sized `lora_A` input gradient
and its sum with the base's. Here the forward writes `x @ W` and adds the rank-r product into it with
one addmm; the backward writes `g @ W^T` and adds the rank-r input gradient into it with one addmm.
Only x and the rank-r `x @ A^T` are kept for the backward; the base weight is dequantized again there
(as bnb's own 4-bit matmul does), never saved. The rank-r product is accumulated in float32 before its
one rounding, so under bf16 it differs from peft's by rounding only; in float32 it is peft's function
(tests/test_fused_lora.py). unsloth's fast_lora kernels do the same per projection.

Layers with anything else (dropout, DoRA/QA-LoRA variants, a LoRA bias, several or disabled adapters,
merged weights, mixed adapter batches, a base kernel without a dense dequantization) keep peft's forward.
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


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


def _base_kind(base) -> str | None:
    """How to get the frozen base's dense weight: bnb 4-bit, gptqmodel's TorchLinear family, a plain
    frozen Linear; None for anything else."""
    if type(getattr(base, "weight", None)).__name__ == "Params4bit":
        return "bnb4bit"
    if hasattr(base, "qweight"):
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        return "gptq" if isinstance(base, TorchLinear) else None
    if type(base) is torch.nn.Linear and not base.weight.requires_grad:
        return "linear"
    return None


def weight_in_out(base, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The base's weight as an [in_features, out_features] tensor (a transposed view where the
    layout is [out, in]: the matmuls read it in place)."""
    with torch.no_grad():
        if kind == "bnb4bit":
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype).t()
        if kind == "gptq":
            from ptq_qlora.quantizers.gptq_frozen import dequantized_weight

            return dequantized_weight(base, dtype)
        return base.weight.to(dtype).t()


class LoraLinear(torch.autograd.Function):
    """y = x @ W + bias + scaling * (x @ A^T) @ B^T over a frozen W; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, kind, scaling):
        weight = weight_in_out(base, kind, x.dtype)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        out = x @ weight
        bias = getattr(base, "bias", None)
        if bias is not None:
            out += bias.to(out.dtype)
        down = x @ a.t()
        out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(x, down, a, b)
        ctx.base, ctx.kind, ctx.scaling = base, kind, scaling
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, down, a, b = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_up = grad @ b  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight_in_out(ctx.base, ctx.kind, x.dtype).t()
            grad_x.addmm_(grad_up, a, alpha=ctx.scaling)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_up.t() @ x).mul_(ctx.scaling).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = (grad.t() @ down).mul_(ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, grad_a, grad_b, None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_lora(self, args, kwargs)
    if name is None:
        return self._unfused_forward(x, *args, **kwargs)
    result_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # a custom Function sees no autocast: cast as it would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    elif getattr(self.base_layer, "compute_dtype", None) is not None:  # bnb's compute dtype, as its forward
        x = x.to(self.base_layer.compute_dtype)
    flat = x.reshape(-1, x.shape[-1])
    out = LoraLinear.apply(flat, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                           self._fused_base_kind, self.scaling[name])
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    # peft returns the base layer's dtype: the input's for bnb and plain layers, the compute dtype under autocast
    return out if torch.is_autocast_enabled(x.device.type) else out.to(result_dtype)


def fuse_lora_layers(peft_model: torch.nn.Module) -> int:
    """Give every peft LoRA layer of `peft_model` whose base has a dense weight the fused forward;
    returns the number of layers (the others keep peft's, logged)."""
    count, others = 0, set()
    for module in peft_model.modules():
        if not all(hasattr(module, a) for a in ("lora_A", "lora_B", "base_layer", "scaling", "lora_variant")):
            continue
        if hasattr(module, "_unfused_forward"):
            continue
        kind = _base_kind(module.base_layer)
        if kind is None:
            others.add(type(module.base_layer).__name__)
            continue
        module._fused_base_kind = kind
        module._unfused_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    if others:
        log.warning("fused_lora: LoRA over %s keeps peft's forward (no dense weight to fuse with)", sorted(others))
    return count
