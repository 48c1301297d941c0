"""Model sources, cache, prompt rendering and size helpers. Caches point at tmp_path; nothing is
downloaded. The SmolLM2 conversion (~30 s) is marked slow but runs in CI."""
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptq_qlora.models import cache, tiny
from ptq_qlora.models.config import ModelConfig
from ptq_qlora.models.loading import (
    HubUnavailableError,
    load_model_and_tokenizer,
    load_tokenizer,
    materialize_source,
)
from ptq_qlora.models.prompting import completion_suffix, render_prompt
from ptq_qlora.models.utils import count_parameters, folder_size_bytes, model_size_bytes
from ptq_qlora.tokenization import encode_prompt

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(path))
    return path


@pytest.fixture
def tiny_cfg():
    return ModelConfig(name="tiny-random", source="tiny-random", prompt_template="{prompt}\nAnswer: ")


# --- tiny-random -------------------------------------------------------------------------------

def test_tiny_random_builds_once_and_round_trips(cache_dir, tiny_cfg, tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(tiny_cfg)
    folder = Path(materialize_source(tiny_cfg))
    assert folder.parent == cache_dir and folder.name.startswith("tiny-random-")
    assert model.config.vocab_size == len(tok) == 259
    assert model.dtype == torch.float32
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert widths == {64, 128} and all(w % 32 == 0 for w in widths)  # GPTQ group size 32 applies

    ids = torch.tensor([tok("The card was charged twice.")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    again, tok_again = load_model_and_tokenizer(tiny_cfg, path=str(tmp_path / "copy"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    assert tok_again("x")["input_ids"] == tok("x")["input_ids"]

    # cached: a second request reuses the folder without building
    monkeypatch.setattr(tiny, "build_tiny_llama", lambda *a, **k: pytest.fail("rebuilt a cached folder"))
    assert Path(materialize_source(tiny_cfg)) == folder


def test_tiny_random_is_deterministic_and_configurable(tmp_path, cache_dir):
    a = tiny.build_tiny_llama(tmp_path / "a", seed=3)
    b = tiny.build_tiny_llama(tmp_path / "b", seed=3)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    wider = ModelConfig(name="t", source="tiny-random", extra={"hidden_size": 96, "seed": 1})
    model, _ = load_model_and_tokenizer(wider)
    assert model.config.hidden_size == 96 and model.config.intermediate_size == 128
    assert materialize_source(wider) != materialize_source(ModelConfig(name="t", source="tiny-random"))
    with pytest.raises(ValueError, match="hiden_size"):
        materialize_source(ModelConfig(name="t", source="tiny-random", extra={"hiden_size": 96}))


def test_tiny_tokenizer_round_trips_text():
    tok = tiny.byte_level_tokenizer()
    text = "Héllo wörld: refund 12.50 € — ok? 😀\n\tend"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # adds BOS like Llama-2
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("ok</s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == {"<s>", "</s>", "<pad>"}


# --- prompts -----------------------------------------------------------------------------------

def test_render_prompt_plain_template_includes_bos_once(tiny_cfg):
    tok = tiny.byte_level_tokenizer()
    rendered = render_prompt(tok, tiny_cfg, "Is {this} ok?")  # braces in the prompt are kept
    assert rendered == "<s>Is {this} ok?\nAnswer: "
    train_ids = encode_prompt(tok, rendered)  # how SFT tokenizes
    eval_ids = tok(rendered, add_special_tokens=False)["input_ids"]  # how generation tokenizes
    assert train_ids == eval_ids and train_ids.count(tok.bos_token_id) == 1
    assert completion_suffix(tok, tiny_cfg) == "</s>"

    # a tokenizer that adds no BOS gets the template alone (e.g. Qwen2 base)
    tok.add_bos_token = False
    assert render_prompt(tok, tiny_cfg, "hi") == "hi\nAnswer: "
    with pytest.raises(ValueError, match="prompt"):
        render_prompt(tok, ModelConfig(name="t", source="x", prompt_template="no placeholder"), "hi")


def test_render_prompt_chat_template():
    tok = tiny.byte_level_tokenizer()
    tok.chat_template = CHATML
    chat = {"chat_template": True, "prompt_template": "P: {prompt}"}
    assert render_prompt(tok, chat, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert completion_suffix(tok, chat) == "<|im_end|>"  # the end of an assistant turn
    assert render_prompt(tok, {**chat, "chat_template": False}, "hi") == "<s>P: hi"

    tok.chat_template = None  # asked for, but the tokenizer has none: plain template
    assert render_prompt(tok, chat, "hi") == "<s>P: hi"
    assert completion_suffix(tok, chat) == "</s>"


def test_load_tokenizer_sets_pad_to_eos_without_new_tokens(tmp_path):
    tok = tiny.byte_level_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "</s>" and len(loaded) == len(tok)


# --- bad inputs --------------------------------------------------------------------------------

def test_bad_sources_fail_with_one_line_errors(tmp_path, tiny_cfg, cache_dir):
    missing = tmp_path / "no" / "such-folder"
    with pytest.raises(FileNotFoundError, match="such-folder"):
        materialize_source(tiny_cfg, path=str(missing))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(tiny_cfg, path=str(tmp_path / "empty"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="LoRA adapter"):
        materialize_source(tiny_cfg, path=str(tmp_path / "adapter"))

    with pytest.raises(ValueError, match="unknown model source 'gpt-17'"):
        materialize_source(ModelConfig(name="x", source="gpt-17"))
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(tiny_cfg, dtype="float8")


def test_unreachable_hub_id_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HubUnavailableError, match="set model.source to a local folder") as err:
        materialize_source(ModelConfig(name="q", source="Qwen/Qwen2-7B", revision="main"))
    assert isinstance(err.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)
    assert "\n" not in str(err.value)


# --- cache -------------------------------------------------------------------------------------

def test_interrupted_build_is_never_read_and_is_replaced(tmp_path):
    def crash(folder):
        (folder / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.build_once("thing", crash, root=tmp_path)
    assert not (tmp_path / "thing").exists() and (tmp_path / ".partial-thing" / "half-written").exists()

    built = cache.build_once("thing", lambda folder: (folder / "ok").write_text("done"), root=tmp_path)
    assert built == tmp_path / "thing" and sorted(os.listdir(built)) == ["ok"]
    assert not (tmp_path / ".partial-thing").exists()
    assert cache.build_once("thing", lambda folder: pytest.fail("rebuilt"), root=tmp_path) == built


# --- size helpers ------------------------------------------------------------------------------

def test_parameter_counts_and_sizes(cache_dir, tiny_cfg):
    model, _ = load_model_and_tokenizer(tiny_cfg)
    trainable, total = count_parameters(model)
    expected = sum(p.numel() for p in model.parameters())
    assert trainable == total == expected
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model)[0] == total - 259 * 64
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_size_bytes(model) == 4 * expected + buffers
    folder = Path(materialize_source(tiny_cfg))
    assert folder_size_bytes(folder) == sum(f.stat().st_size for f in folder.iterdir())

    class PackedLinear(torch.nn.Module):  # GPTQ-style: weight packed in int32 buffers
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 64, 32
            self.register_buffer("qweight", torch.zeros(64 // 8, 32, dtype=torch.int32))
            self.register_buffer("scales", torch.zeros(2, 32, dtype=torch.float16))

    packed = PackedLinear()
    assert count_parameters(packed) == (0, 64 * 32)
    assert model_size_bytes(packed) == 8 * 32 * 4 + 2 * 32 * 2  # 4 bits per weight + scales


# --- SmolLM2 from the GGUF package ---------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_converts_once_and_answers(cache_dir):
    from ptq_qlora.models.smollm2 import CACHE_NAME, PROVENANCE_FILE

    leftover = cache.partial_dir(CACHE_NAME, cache_dir)  # an interrupted earlier conversion
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{not json")
    cfg = ModelConfig(name="smollm2-135m", source="gguf-package", chat_template=True)

    folder = Path(materialize_source(cfg))
    assert folder == cache_dir / CACHE_NAME and not leftover.exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    assert json.loads((folder / "generation_config.json").read_text()).get("do_sample") is False
    assert "4-bit" in json.loads((folder / PROVENANCE_FILE).read_text())["note"]

    model = AutoModelForCausalLM.from_pretrained(folder)  # a plain checkpoint now
    tok = AutoTokenizer.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.get_input_embeddings().weight

    model, tok = load_model_and_tokenizer(cfg)  # cached: no second conversion
    prompt = render_prompt(tok, cfg, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert completion_suffix(tok, cfg) == "<|im_end|>" == tok.eos_token
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
