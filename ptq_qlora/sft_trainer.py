"""The stage's Trainer: TRL's SFTTrainer with less host work per step, and two GPU speed options.

Measured on an H200 (benchmarks/RESULTS.md, fifth session): the same QLoRA model path trained 5% faster
in a plain loop than through the Trainer, and the GPU sat idle 9% of a Trainer step. Profiling the
Trainer's step on the CPU (32 decoder layers) put the host time after the backward in: the FLOP count
for the logs (`floating_point_ops`, which walks every parameter each step), gradient clipping, the
optimizer step and `zero_grad`. On a GPU that time is hidden behind the backward, unless a host sync
comes first, and in the Trainer two do: the NaN filter of the logged loss (`torch.isnan(loss)` as a
Python bool) and the token count (`.item()`), both right after the backward is queued, plus TRL's
loss, whose per-step entropy/accuracy metrics are read back between the forward and the backward.

- always: the FLOP count per token is computed once (the same numbers, without the walk every step);
- `hardware.model_loss`: the loss is the model's own (with Liger: its fused linear cross-entropy)
  instead of TRL's fused LM head: the same quantity (summed over completion tokens, divided by the
  Trainer's count of them), rounded by another kernel; TRL's entropy and mean_token_accuracy log
  entries are gone with its head;
- `hardware.deferred_step_syncs`: the token count stays on the device until the optimizer step is
  queued (one read a step, at its end) and the logged loss is not NaN-filtered (a NaN shows in the logs
  instead of being replaced by an average: a diverging run is seen, not hidden). Measured +3.5% tok/s on a
  7B (H200, sixth session; GPU idle 9% -> 4.4% of a step): on in the h100/h200/a100 profiles.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache  # one class per process (trl imported on first use)
def project_trainer_class():
    """SFTTrainer with the above; `model_loss` / `defer_syncs` are set on the instance after construction
    (`configure_trainer`)."""
    from transformers import Trainer, TrainerCallback
    from trl import SFTTrainer

    class FlushTokenCount(TrainerCallback):
        """Reads the deferred token count into the state at each step's end, before any other callback,
        the logs or a checkpoint use it."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            self.trainer.flush_token_count()

        on_train_end = on_step_end

    class ProjectSFTTrainer(SFTTrainer):
        model_loss = False
        defer_syncs = False
        _flops_per_token = None
        _pending_tokens = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.model_loss:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            inputs["use_cache"] = False  # as TRL's: no cache under checkpointing
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def floating_point_ops(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            tokens = inputs[main].numel() if main in inputs else 0
            if self._flops_per_token is None or not tokens:
                flops = super().floating_point_ops(inputs)
                if tokens:
                    self._flops_per_token = int(flops) // tokens  # 6 x parameters: exact
                return flops
            return self._flops_per_token * tokens

        def _track_num_input_tokens(self, inputs):
            if not (self.defer_syncs and self.args.include_num_input_tokens_seen == "non_padding"):
                return super()._track_num_input_tokens(inputs)
            import torch

            # transformers' "non_padding" count, kept on the device (no .item() here)
            pad_id = getattr(self.processing_class, "pad_token_id", None)
            if "attention_mask" in inputs:
                count = inputs["attention_mask"].sum()
            elif pad_id is not None:
                count = (inputs["input_ids"] != pad_id).sum()
            else:  # as transformers: no way to tell padding, every token counts
                count = inputs["input_ids"].numel()
            count = self.accelerator.gather(torch.as_tensor(count, device=self.args.device, dtype=torch.int64)).sum()
            self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

        def flush_token_count(self):
            if self._pending_tokens is not None:
                self.state.num_input_tokens_seen += int(self._pending_tokens.item())
                self._pending_tokens = None

    ProjectSFTTrainer.FlushTokenCount = FlushTokenCount
    return ProjectSFTTrainer


def configure_trainer(trainer, model_loss: bool, defer_syncs: bool) -> None:
    trainer.model_loss = model_loss
    trainer.defer_syncs = defer_syncs
    if defer_syncs:  # first, so every other on_step_end callback already sees the step's tokens
        trainer.callback_handler.callbacks.insert(0, type(trainer).FlushTokenCount(trainer))


def apply_liger_with_fused_loss(model) -> None:
    """Liger's kernels on `model` (a PEFT model's base), its fused linear cross-entropy included, before
    the Trainer is built (TRL refuses that kernel in its own arguments: it would replace TRL's head)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=True)
    log.info("model_loss: Liger kernels with its fused linear cross-entropy (the loss without full logits)")
