"""A LoRA layer over a frozen (4-bit or 16-bit) base as one autograd function (hardware.fused_lora).

peft computes `base(x) + lora_B(lora_A(x)) * scaling` through autograd: per layer and step that is an
output-sized product, its scaled copy and the sum in the forward (twice, with the checkpoint's
recomputation), and in the backward the scaling's gradient, an input-sized `lora_A` input gradient
and its sum with the base's. Here the forward writes `x @ W` and adds the rank-r product into it with
one addmm; the backward writes `g @ W^T` and adds the rank-r input gradient into it with one addmm.
Only x and the rank-r `x @ A^T` are kept for the backward; the base weight is dequantized again there
(as bnb's own 4-bit matmul does), never saved; except, with `keep_recomputed_weights`, in an offloaded
checkpoint's recomputation, whose backward follows at once: the weights dequantized there serve it
(one dequantization fewer per layer and step, one layer's 16-bit weights more at the peak). The rank-r
product is accumulated in float32 before its one rounding, so under bf16 it differs from peft's by
rounding only; in float32 it is peft's function (tests/test_fused_lora.py). unsloth's fast_lora kernels
do the same per projection.

Layers with anything else (dropout, DoRA/QA-LoRA variants, a LoRA bias, several or disabled adapters,
merged weights, mixed adapter batches, a base kernel without a dense dequantization) keep peft's forward.
"""
from __future__ import annotations

import logging
import types

import torch

from ptq_qlora.activation_offload import recomputing

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


class LoraGroup(torch.autograd.Function):
    """y_i = x @ W_i + bias_i + scaling_i * (x @ A_i^T) @ B_i^T over frozen W_i, for one LoRA layer or
    sibling layers that read the same input (q/k/v, gate/up) in one node: their rank-r
    down-projections are one matmul over the stacked A's, and the backward accumulates the input
    gradient of every member into one buffer (addmm with beta 1) instead of autograd summing one
    input-sized gradient per member."""

    @staticmethod
    def forward(ctx, x, spec, *weights):
        bases, kinds, scalings, ranks, keep = spec
        lora_as, lora_bs = weights[0::2], weights[1::2]
        a = torch.cat([w.to(x.dtype) for w in lora_as])  # [sum r, in]
        bs = [w.to(x.dtype) for w in lora_bs]
        down = x @ a.t()  # [tokens, sum r]
        outs, kept, start = [], [], 0
        for base, kind, scaling, rank, b in zip(bases, kinds, scalings, ranks, bs):
            weight = weight_in_out(base, kind, x.dtype)
            if keep:
                kept.append(weight)
            out = x @ weight
            if getattr(base, "bias", None) is not None:
                out += base.bias.to(out.dtype)
            out.addmm_(down[:, start:start + rank], b.t(), alpha=scaling)
            outs.append(out)
            start += rank
        ctx.save_for_backward(x, down, a, *bs, *kept)
        ctx.spec = spec
        ctx.param_dtypes = [w.dtype for w in weights]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        bases, kinds, scalings, ranks, _ = ctx.spec
        x, down, a, *rest = ctx.saved_tensors
        bs, kept = rest[:len(ranks)], rest[len(ranks):]
        grad_x, grad_ups, grad_bs, start = None, [], [], 0
        for i, (grad, base, kind, scaling, rank, b) in enumerate(zip(grads, bases, kinds, scalings, ranks, bs)):
            if grad is None:  # an output nobody used
                grad_ups.append(x.new_zeros(x.shape[0], rank))
                grad_bs.append(None)
            else:
                grad = grad.to(x.dtype)
                grad_ups.append((grad @ b).mul_(scaling))  # scaled here: one addmm below for all members
                grad_bs.append((grad.t() @ down[:, start:start + rank]).mul_(scaling))
                weight_t = (kept[i] if kept else weight_in_out(base, kind, x.dtype)).t()
                grad_x = grad @ weight_t if grad_x is None else grad_x.addmm_(grad, weight_t)
            start += rank
        grad_up = torch.cat(grad_ups, dim=1)  # [tokens, sum r]
        if grad_x is not None:
            grad_x.addmm_(grad_up, a)
        grad_a = grad_up.t() @ x  # [sum r, in]
        weights_grads, start = [], 0
        for i, rank in enumerate(ranks):
            weights_grads.append(grad_a[start:start + rank].to(ctx.param_dtypes[2 * i]))
            weights_grads.append(None if grad_bs[i] is None else grad_bs[i].to(ctx.param_dtypes[2 * i + 1]))
            start += rank
        return (grad_x, None, *weights_grads)


def run_group(flat: torch.Tensor, members: list, names: list[str]) -> tuple:
    """LoraGroup over `members` (peft LoRA layers fused by fuse_lora_layers) with adapters `names`."""
    keep = members[0]._fused_keep_weights and torch.is_grad_enabled() and recomputing()
    spec = ([m.base_layer for m in members], [m._fused_base_kind for m in members],
            [m.scaling[n] for m, n in zip(members, names)], [m.lora_A[n].weight.shape[0] for m, n in zip(members, names)],
            keep)
    weights = [w for m, n in zip(members, names) for w in (m.lora_A[n].weight, m.lora_B[n].weight)]
    return LoraGroup.apply(flat, spec, *weights)


class _SiblingGroup:
    """Runs LoraGroup once for the members' shared input and hands each member its output; the
    cache is dropped once every member has taken its output (or a call brings another input)."""

    def __init__(self, members: list):
        self.members = members
        self._input, self._outputs, self._taken = None, None, set()

    def output_for(self, layer, given: torch.Tensor, flat: torch.Tensor, names: list[str]) -> torch.Tensor:
        """`given`: the tensor the member was called with (the same object for every sibling, while
        `flat`, its cast and reshaped view, is a new object per call)."""
        index = self.members.index(layer)
        if self._input is not given or index in self._taken:
            self._input, self._outputs, self._taken = given, run_group(flat, self.members, names), set()
        out = self._outputs[index]
        self._taken.add(index)
        if len(self._taken) == len(self.members):
            self._input = self._outputs = None
        return out


def _compute_input(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # a custom Function sees no autocast: cast as it would
        return x.to(torch.get_autocast_dtype(x.device.type))
    if getattr(self.base_layer, "compute_dtype", None) is not None:  # bnb's compute dtype, as its forward
        return x.to(self.base_layer.compute_dtype)
    return x


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_lora(self, args, kwargs)
    if name is None:
        return self._unfused_forward(x, *args, **kwargs)
    result_dtype, given = x.dtype, x
    x = _compute_input(self, x)
    flat = x.reshape(-1, x.shape[-1])
    group = getattr(self, "_fused_group", None)
    names = [_plain_lora(m, (), {}) for m in group.members] if group is not None else None
    if names is not None and all(n == name for n in names):
        out = group.output_for(self, given, flat, names)
    else:
        out = run_group(flat, [self], [name])[0]
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    # peft returns the base layer's dtype: the input's for bnb and plain layers, the compute dtype under autocast
    return out if torch.is_autocast_enabled(x.device.type) else out.to(result_dtype)


# projections that read the same input in Llama-style blocks (Llama, Mistral, Qwen2, SmolLM2)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_layers(peft_model: torch.nn.Module, keep_recomputed_weights: bool = False) -> int:
    """Give every peft LoRA layer of `peft_model` whose base has a dense weight the fused forward;
    returns the number of layers (the others keep peft's, logged). `keep_recomputed_weights`: see the
    module's docstring (acts only under ptq_qlora/activation_offload.py's checkpoint)."""
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
        module._fused_keep_weights = keep_recomputed_weights
        module._unfused_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    if others:
        log.warning("fused_lora: LoRA over %s keeps peft's forward (no dense weight to fuse with)", sorted(others))
    for parent in peft_model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(m is not None and hasattr(m, "_fused_base_kind") for m in members):
                group = _SiblingGroup(members)
                for m in members:
                    m._fused_group = group
    return count
