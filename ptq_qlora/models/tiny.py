"""A tiny random Llama and a byte-level tokenizer, built in code (no downloads): what the tests
train, quantize and evaluate in seconds on a CPU.

- Every linear layer's input width (hidden 64, intermediate 128) is a multiple of 32, so GPTQ with
  group size 32 applies to it. Overrides through `model.extra` should keep that true.
- The tokenizer has one token per byte (every string encodes; decode(encode(s)) == s) plus <s>,
  </s>, <pad>, and adds <s> in front like Llama-2's, so the BOS handling of base models is exercised.
- The weights depend only on the seed and settings (and the torch/transformers versions); the
  folder is cached under a hash of them, and loads with a plain `from_pretrained(folder)`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ptq_qlora.models.cache import build_once

TINY_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096)
DEFAULT_SEED = 0
# Bump when the builder changes, so folders cached by an older builder are not reused.
BUILDER_VERSION = 1


def byte_level_tokenizer(model_max_length: int = TINY_DEFAULTS["max_position_embeddings"]):
    """256 byte tokens + <s>, </s>, <pad> (vocab 259); BOS is added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   add_bos_token=True, model_max_length=model_max_length)


def tiny_settings(extra: dict | None = None) -> tuple[dict, int]:
    """(LlamaConfig overrides, seed) from `model.extra`; an unknown key fails instead of being ignored."""
    from transformers import LlamaConfig

    extra = dict(extra or {})
    seed = int(extra.pop("seed", DEFAULT_SEED))
    known = set(LlamaConfig().to_dict())
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"unknown tiny-random setting(s) {unknown} in model.extra; use LlamaConfig fields or seed")
    return {**TINY_DEFAULTS, **extra}, seed


def build_tiny_llama(out_dir: str | Path, seed: int = DEFAULT_SEED, **config_overrides) -> Path:
    """Save a random LlamaForCausalLM (TINY_DEFAULTS + overrides), its tokenizer and a greedy
    generation config to `out_dir`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    settings = {**TINY_DEFAULTS, **config_overrides}
    tok = byte_level_tokenizer(settings["max_position_embeddings"])
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(**{**settings, "vocab_size": len(tok), **ids})
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


def tiny_llama_folder(extra: dict | None = None) -> Path:
    """The cached folder for these settings, built on first use."""
    settings, seed = tiny_settings(extra)
    key = json.dumps({"settings": settings, "seed": seed, "builder": BUILDER_VERSION}, sort_keys=True)
    name = f"tiny-random-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return build_once(name, lambda tmp: build_tiny_llama(tmp, seed=seed, **settings))
