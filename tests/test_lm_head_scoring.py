"""TRL's fused LM head scores only the completion positions on CPU inside `completion_positions_only`,
with the loss and gradients of the full scoring (masked positions contribute exact zeros)."""
import torch
from transformers import AutoModelForCausalLM
from trl.trainer import utils as trl_utils

from ptq_qlora.lm_head_scoring import completion_positions_only
from ptq_qlora.models.tiny import tiny_llama_folder


ORIGINAL_APPLY = trl_utils._ChunkedLogProbFunction.apply


def _loss_grads_and_scored_rows(model, batch, monkeypatch):
    scored = []
    original_apply = ORIGINAL_APPLY

    def counting_apply(hidden, *args):
        scored.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, scored


def test_compact_scoring_matches_full_scoring_on_cpu(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_folder()), dtype=torch.float32)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(3, model.config.vocab_size, (3, 24))
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]  # 5 completion tokens a row, each predicted from the position before
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    full_loss, full_grads, full_rows = _loss_grads_and_scored_rows(model, batch, monkeypatch)
    with completion_positions_only() as active:
        compact_loss, compact_grads, compact_rows = _loss_grads_and_scored_rows(model, batch, monkeypatch)
    assert active
    assert full_rows == [3 * 23] and compact_rows == [3 * 5]
    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-6, atol=0)
    assert full_grads.keys() == compact_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the switch is restored after the block
    assert not trl_utils._use_triton(torch.device("cpu"))
