"""generate_batched on a tiny random Llama and a byte-level tokenizer built in code (no downloads)."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ptq_qlora.generation import generate_batched

PROMPTS = [
    "<s>Hi",
    "<s>A much longer prompt than the others, so padding matters.",
    "<s>Mid-length prompt here",
    "<s>x",
    "<s>Another prompt of some length",
]
MAX_NEW = 12


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    # Byte-level BPE without merges: one token per byte, plus the special tokens.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = dict(bos_token="<s>", eos_token="</s>")
    if with_pad:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def one_by_one(model, tokenizer, prompts):
    """Reference: each prompt alone (no padding at all), plain greedy generate."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tokenizer.pad_token_id
                ),
            )
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outputs


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    return one_by_one(model, tokenizer, PROMPTS)


def test_batched_matches_one_by_one_in_original_order(model, tokenizer, reference):
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)  # really different lengths
    batched = generate_batched(model, tokenizer, PROMPTS, MAX_NEW, batch_size=3)
    assert batched == reference
    assert any(text for text in batched)  # not trivially empty


def test_batches_are_length_sorted(model, tokenizer, reference, monkeypatch):
    seen_lengths = []
    original = model.generate

    def recording_generate(*args, **kwargs):
        seen_lengths.append(kwargs["attention_mask"].sum(dim=1).tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    assert generate_batched(model, tokenizer, PROMPTS, MAX_NEW, batch_size=2) == reference
    flat = [length for batch in seen_lengths for length in batch]
    assert flat == sorted(flat, reverse=True)
    assert [len(batch) for batch in seen_lengths] == [2, 2, 1]


def test_sampling_generation_config_is_ignored(model, tokenizer, reference, monkeypatch):
    passed_configs = []
    original = model.generate

    def recording_generate(*args, **kwargs):
        passed_configs.append(kwargs["generation_config"])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=5.0, top_k=0, top_p=1.0, repetition_penalty=1.8,
        eos_token_id=tokenizer.eos_token_id,
    )
    try:
        first = generate_batched(model, tokenizer, PROMPTS, MAX_NEW, batch_size=4)
        torch.manual_seed(123)
        second = generate_batched(model, tokenizer, PROMPTS, MAX_NEW, batch_size=4)
    finally:
        model.generation_config = saved
    assert first == second == reference
    # transformers 5 fills None fields from model.generation_config, so neutral values must be explicit.
    for config in passed_configs:
        assert config.do_sample is False and config.num_beams == 1
        assert config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0


def test_tokenizer_and_model_state_untouched(model, tokenizer, reference):
    no_pad = make_tokenizer(with_pad=False)
    no_pad.padding_side = "right"
    model.train()
    out = generate_batched(model, no_pad, PROMPTS, MAX_NEW, batch_size=3, inference_mode=False)
    assert no_pad.padding_side == "right"
    assert no_pad.pad_token is None
    assert model.training  # eval only for the call
    model.eval()
    # Padding with eos instead of <pad> is masked out, so the output is the same.
    assert out == reference


def test_stop_strings_cut_the_output(model, tokenizer, reference):
    index, text = next((i, t) for i, t in enumerate(reference) if len(t) >= 4)
    stop = text[2]
    out = generate_batched(model, tokenizer, [PROMPTS[index]], MAX_NEW, stop_strings=[stop])
    assert out == [text.split(stop, 1)[0].strip()]


def test_empty_prompt_list(model, tokenizer):
    assert generate_batched(model, tokenizer, [], MAX_NEW) == []
