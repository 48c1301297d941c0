"""Batched greedy generation for evaluation: deterministic, left-padded, length-sorted."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

# transformers 5 fills every field a GenerationConfig leaves at None from `model.generation_config`
# (the saved generation_config.json; e.g. Qwen2-Instruct's repetition_penalty=1.05 would otherwise
# apply). So besides do_sample=False, pin every knob that changes which token greedy decoding picks to
# its neutral value; eos/bos ids are still taken from the model (that is wanted). Fields whose neutral
# value is None (suppress_tokens, bad_words_ids, ...) cannot be pinned this way; checkpoints used here
# do not set them.
_NEUTRAL_DECODING = dict(
    do_sample=False,
    num_beams=1,
    num_return_sequences=1,
    use_cache=True,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    min_new_tokens=0,  # takes precedence over a saved min_length (setting both only warns)
    length_penalty=1.0,
    renormalize_logits=False,
    remove_invalid_values=False,
)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _greedy_config(model, tokenizer, max_new_tokens: int, pad_token_id: int, stop_strings):
    config = GenerationConfig(
        **_NEUTRAL_DECODING,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        stop_strings=list(stop_strings) if stop_strings else None,
    )
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def _cut_at_stop(text: str, stop_strings) -> str:
    for stop in stop_strings or ():
        text = text.split(stop, 1)[0]
    return text


def generate_batched(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    stop_strings=None,
    desc: str = "generate",
    inference_mode: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, returned in the order given.

    - Prompts must be fully rendered (chat template applied, BOS included if the model wants one):
      they are tokenized with `add_special_tokens=False`, so nothing is added a second time.
    - Greedy always: a fresh GenerationConfig with do_sample=False and neutral penalties, so a saved
      generation_config (gptqmodel writes `do_sample: true`; chat models ship temperature, top_p,
      repetition_penalty) cannot change the output. KV cache on.
    - Prompts are tokenized once, sorted by length (longest first: less padding per batch, and an
      out-of-memory shows up on the first batch), left-padded by hand and generated batch by batch.
      Padding by hand means the tokenizer is never modified: its padding_side and pad token stay as
      they were (pad id used: tokenizer.pad_token_id, else eos).
    - Only the new tokens are decoded (skip_special_tokens=True), cut at the first stop string if
      `stop_strings` is given (generation also stops there), and stripped.
    - The model is put in eval mode for the call and returned to train mode after if it was training.
    - `inference_mode=True` runs under torch.inference_mode(); pass False to use torch.no_grad().
      Why: on CPU some 4-bit kernels (bitsandbytes' AVX512-BF16 path, gptqmodel's TorchAten kernel)
      give silently wrong LoRA gradients later if an inference-mode forward ran first, so callers that
      evaluate a model they will train afterwards should pass False.
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")

    token_rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [i for i, row in enumerate(token_rows) if not row]
    if empty:
        raise ValueError(f"prompts at positions {empty[:10]} tokenize to nothing")
    order = sorted(range(len(prompts)), key=lambda i: -len(token_rows[i]))  # stable: ties keep order
    config = _greedy_config(model, tokenizer, max_new_tokens, pad_token_id, stop_strings)
    device = _model_device(model)
    completions: list[str | None] = [None] * len(prompts)

    was_training = model.training
    model.eval()
    grad_context = torch.inference_mode() if inference_mode else torch.no_grad()
    try:
        with grad_context, tqdm(total=len(prompts), desc=desc, unit="ex") as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, attention_mask = _left_pad([token_rows[i] for i in batch], pad_token_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    tokenizer=tokenizer,  # StopStringCriteria needs it
                )
                new_tokens = output[:, input_ids.shape[1]:]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    completions[i] = _cut_at_stop(text, stop_strings).strip()
                progress.update(len(batch))
    finally:
        if was_training:
            model.train()
    return completions
