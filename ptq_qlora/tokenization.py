"""One way to turn rendered prompts into token ids, shared by training and generation, so the
model sees the same tokens at train and test time (BOS included or not, never twice)."""
from __future__ import annotations


def encode_prompt(tokenizer, rendered_prompt: str) -> list[int]:
    """Token ids of a prompt already rendered by `ptq_qlora.models.prompting.render_prompt`, which
    writes any BOS the model expects into the text; so no special tokens are added here, exactly
    as `generate_batched` encodes prompts."""
    return tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"]


def encode_training_example(tokenizer, rendered_prompt: str, completion: str) -> dict:
    """`input_ids` and a `completion_mask` (1 on answer tokens) so the loss covers the response
    only. Prompt and completion are encoded apart so no token merges across the boundary; the
    completion must already end with the model's end-of-answer text (see `completion_suffix`)."""
    prompt_ids = encode_prompt(tokenizer, rendered_prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
