"""`hardware.model_loss`: train on the model's own loss (with Liger: its fused linear cross-entropy)
instead of TRL's.

TRL's SFTTrainer computes the loss through its own fused LM head, which also yields per-token entropy
and top-1 accuracy for the logs, and reads those back with `.item()` on every step, between the
forward and the backward: the GPU drains and waits for the host there (benchmarks/RESULTS.md, fifth
session: the same model path trained 5% faster in a plain loop; the GPU sat idle 9% of a Trainer
step). Here the Trainer's `compute_loss` runs the model with its labels, as transformers' own
Trainer does; the loss is the same quantity (summed over completion tokens, divided by the Trainer's
count of them), rounded by another kernel. The entropy and mean_token_accuracy log entries are gone
with TRL's head.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def model_loss_trainer_class():
    """SFTTrainer whose training loss is the model's own (no TRL fused LM head, no per-step metrics)."""
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # as TRL's: no cache under checkpointing
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


def apply_liger_with_fused_loss(model) -> None:
    """Liger's kernels on `model` (a PEFT model's base), its fused linear cross-entropy included, before
    the Trainer is built (TRL refuses that kernel in its own arguments: it would replace TRL's head)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=True)
    log.info("model_loss: Liger kernels with its fused linear cross-entropy (the loss without full logits)")
