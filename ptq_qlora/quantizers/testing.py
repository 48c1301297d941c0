"""Test helpers: a tiny random Llama + byte tokenizer (no downloads), and a dequantized fp32 reference
for checking LoRA gradients through a 4-bit base. Small enough to run in CPU unit tests."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from ptq_qlora.models.tiny import build_tiny_llama, byte_level_tokenizer  # noqa: F401  (re-exported for tests)
from ptq_qlora.quantizers.common import dequantize_linear  # noqa: F401  (re-exported for tests)


def random_texts(n: int, seed: int = 0, length: int = 120) -> list[str]:
    rng = random.Random(seed)
    words = "the bank card was charged twice please refund my transfer account balance summary".split()
    return [" ".join(rng.choice(words) for _ in range(length // 6)) for _ in range(n)]


def dequantized_reference(peft_model) -> torch.nn.Module:
    """fp32 twin of a LoRA-on-4-bit model: dequantized base layers, same other weights, same LoRA.
    Build it before any inference pass (TorchAten's repacking destroys the original qweight)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    ref = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            parent, child = name.rsplit(".", 1)
            setattr(ref.get_submodule(parent), child, dequantize_linear(module.base_layer))
    plain = {n: p.detach().float() for n, p in base.named_parameters() if "lora_" not in n and ".base_layer." not in n}
    unexpected = ref.load_state_dict(plain, strict=False).unexpected_keys
    assert not unexpected, f"reference lacks {unexpected}"
    ref = get_peft_model(ref, copy.deepcopy(peft_model.peft_config["default"]))
    lora = {n: p.detach().float() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert not ref.load_state_dict(lora, strict=False).unexpected_keys
    return ref


def lora_gradients(peft_model, input_ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of every trainable (LoRA) parameter for one causal-LM batch."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def relative_gradient_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(||g - g_ref|| / ||g_ref|| over all LoRA params, worst per-tensor relative error)."""
    assert grads.keys() == reference.keys()
    diff = sum(((grads[k].float() - reference[k].float()) ** 2).sum() for k in reference) ** 0.5
    norm = sum((reference[k].float() ** 2).sum() for k in reference) ** 0.5
    worst = max(((grads[k].float() - reference[k].float()).norm() / reference[k].float().norm().clamp_min(1e-30)).item()
                for k in reference)
    return (diff / norm).item(), worst
