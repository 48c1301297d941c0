"""How a task prompt becomes model input, identically at train and test time: the tokenizer's
chat template for chat models (SmolLM2-Instruct), a plain template for base models (the paper
fine-tuned base Qwen2-7B / Llama-2-7B / Mistral-7B).

The rendered text is complete: where the tokenizer would add a BOS token itself (Llama-2,
Mistral), the plain rendering starts with it, because generation tokenizes rendered prompts with
`add_special_tokens=False` (ptq_qlora.generation) and training adds special tokens only when the
text does not already start with BOS (ptq_qlora.tokenization): both then see exactly one BOS.
Chat templates insert BOS themselves where the model wants one.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MARK = "\uE000ANSWER\uE000"  # private-use characters: cannot occur in a chat template
_warned_no_template: set[str] = set()  # render_prompt runs once per example: warn once per tokenizer


def _field(model_cfg, key: str, default=None):
    return model_cfg.get(key, default) if isinstance(model_cfg, dict) else getattr(model_cfg, key, default)


def uses_chat_template(tokenizer, model_cfg) -> bool:
    wanted = bool(_field(model_cfg, "chat_template", False))
    available = bool(getattr(tokenizer, "chat_template", None))
    if wanted and not available and tokenizer.name_or_path not in _warned_no_template:
        _warned_no_template.add(tokenizer.name_or_path)
        log.warning("model.chat_template is true but the tokenizer has none: using model.prompt_template")
    return wanted and available


def adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts the BOS token in front."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def render_prompt(tokenizer, model_cfg, prompt: str) -> str:
    if uses_chat_template(tokenizer, model_cfg):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    template = _field(model_cfg, "prompt_template")
    if not template or "{prompt}" not in template:
        raise ValueError(f"model.prompt_template must contain {{prompt}}, got {template!r}")
    text = template.format(prompt=prompt)
    return tokenizer.bos_token + text if adds_bos(tokenizer) else text


def completion_suffix(tokenizer, model_cfg) -> str:
    """The text that ends an answer, appended to training targets so the model learns to stop
    where generation stops: the chat template's end of an assistant turn (`<|im_end|>` for
    ChatML, which is SmolLM2's eos), else the eos token."""
    if uses_chat_template(tokenizer, model_cfg):
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _MARK}], tokenize=False)
        except Exception as err:  # a template that refuses this conversation: fall back to eos
            log.warning("could not render an assistant turn with the chat template (%s); ending answers with eos", err)
            rendered = ""
        tail = rendered.split(_MARK, 1)[1].strip() if _MARK in rendered else ""
        eos = tokenizer.eos_token
        if eos and eos in tail:
            tail = tail[: tail.index(eos) + len(eos)]
        if tail:
            return tail
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token: answers would never end")
    return tokenizer.eos_token
