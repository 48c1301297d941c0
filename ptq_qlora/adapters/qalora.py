"""QA-LoRA (Xu et al., 2023): LoRA whose input is pooled over the base's quantization groups.

With GPTQ groups of `g` contiguous input features (desc_act=false: input i is in group i // g), the
adapter sees one pooled feature per group, so A is (in/g -> r) and B is (r -> out). Its output is then
linear in the *sum* of each group's inputs: the adapter adds one constant c[o, j] to every weight of
output row o in input group j. That constant folds into the group's zero point, which is how the
trained model is merged without leaving the low-bit grid (quantizers/qalora_merge.py).

Training uses peft's own QA-LoRA variant for GPTQ layers (`LoraConfig(use_qalora=True)`, peft >= 0.17):
it pools with a mean and scales the pooled feature by in/g. `group_constants` derives c from that
convention and `check_group_constants` re-checks it against peft's forward, so a change in peft's
pooling cannot silently make a merge wrong.
"""
from __future__ import annotations

import torch

from ptq_qlora.adapters.lora import attach_lora

ADAPTER = "default"


def attach_qalora(model: torch.nn.Module, target_modules: list[str], r: int, alpha: int, dropout: float,
                  group_size: int, gradient_checkpointing: bool = False):
    """QA-LoRA on a GPTQ model loaded for training; `group_size` must be the GPTQ group size."""
    if group_size <= 0:
        raise ValueError(f"QA-LoRA pools over the quantization groups; group_size={group_size} has none "
                         "(use a GPTQ group size such as 32, 64 or 128)")
    peft_model = attach_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout,
                             gradient_checkpointing=gradient_checkpointing,
                             lora_options={"use_qalora": True, "qalora_group_size": group_size})
    plain = [name for name, module in lora_modules(peft_model) if not is_qalora(module)]
    if plain:
        raise ValueError(f"QA-LoRA needs GPTQ-quantized targets; {plain[0]} (and {len(plain) - 1} more) got a "
                         "plain LoRA adapter, which could not be merged into the low-bit weights")
    return peft_model


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def is_qalora(module: torch.nn.Module, adapter: str = ADAPTER) -> bool:
    return adapter in getattr(module, "qalora_group_size", {})


def group_constants(module: torch.nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """c[o, j] (float64, [out, in/g]): what the adapter adds to each weight of row o, input group j.

    peft's forward: delta = s * (n * mean_group(x)) @ A^T @ B^T with n = in/g groups, i.e.
    delta_o = sum_i x_i * (s * n / g) * (B @ A)[o, i // g]."""
    if not is_qalora(module, adapter):
        raise ValueError(f"{type(module).__name__} has no QA-LoRA adapter {adapter!r}")
    a = module.lora_A[adapter].weight.detach().double()  # [r, n]
    b = module.lora_B[adapter].weight.detach().double()  # [out, r]
    g = module.qalora_group_size[adapter]
    n = a.shape[1]
    return (module.scaling[adapter] * n / g) * (b @ a)


def check_group_constants(module: torch.nn.Module, constants: torch.Tensor, adapter: str = ADAPTER,
                          tolerance: float = 1e-5) -> float:
    """Run peft's QA-LoRA forward on random inputs and require x @ expand(c)^T; returns the relative error."""
    g = module.qalora_group_size[adapter]
    in_features = constants.shape[1] * g
    weight = module.lora_A[adapter].weight
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        was_training = module.training
        module.eval()  # dropout off
        zero = torch.zeros(4, constants.shape[0], dtype=weight.dtype, device=weight.device)
        got = module.lora_variant[adapter].forward(module, active_adapter=adapter, x=x.to(weight), result=zero)
        module.train(was_training)
    expected = x @ constants.repeat_interleave(g, dim=1).T
    error = ((got.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    if error > tolerance:
        raise RuntimeError(f"peft's QA-LoRA forward no longer matches the group constants (relative error "
                           f"{error:.3g}); the merge would be wrong")
    return error
