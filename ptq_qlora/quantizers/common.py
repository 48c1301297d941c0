"""Helpers shared by the quantization methods: dtypes, source checks, sizes, generation config."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.").lower()]
    except KeyError:
        raise ValueError(f"unknown compute dtype {dtype!r}; known: {', '.join(sorted(_DTYPES))}") from None


def default_device_map() -> dict:
    """The whole model on this process's GPU (cuda:LOCAL_RANK: one replica per GPU under DDP)."""
    from ptq_qlora.distributed import local_device

    return {"": local_device()}


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def check_source_dir(src_dir: Path) -> None:
    """A finished HF checkpoint: config.json, weights, and every shard its index names."""
    src_dir = Path(src_dir)
    if not (src_dir / "config.json").is_file():
        raise FileNotFoundError(f"source checkpoint {src_dir} is missing or unfinished: no config.json")
    if not weight_files(src_dir):
        raise FileNotFoundError(f"source checkpoint {src_dir} is unfinished: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for index in src_dir.glob("*.index.json"):
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (src_dir / s).is_file())
        if missing:
            raise FileNotFoundError(f"source checkpoint {src_dir} is unfinished: {index.name} names missing shards {missing}")


def prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty; the PTQ stage writes into a fresh folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def disk_bytes(folder: Path) -> int:
    """Bytes of the weight files only (config/tokenizer files are noise next to weights)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def checkpoint_param_count(folder: Path) -> int:
    """Parameter count read from safetensors headers, without loading any tensor."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's tensors, packed storage counted at its real size.

    Params and buffers are deduplicated by storage (tied embeddings count once). bitsandbytes keeps
    its per-block constants (absmax, nested absmax, code) in a QuantState outside the module's
    tensors, so those are added explicitly.
    """
    seen, total = set(), 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # bnb: absmax, code, then the nested state of double quantization
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total


def write_greedy_generation_config(out_dir: Path, src_dir: Path | None = None) -> None:
    """Deterministic decoding for evaluation; gptqmodel writes `do_sample: true` (and instruct
    models ship sampling defaults), which would make the three evaluation points incomparable."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(src_dir or out_dir))
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out_dir)))
    gen.do_sample = False
    gen.num_beams = 1
    gen.temperature = gen.top_p = gen.top_k = gen.min_p = gen.typical_p = None
    gen.save_pretrained(str(out_dir))


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (checkpoints are immutable once written), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dequantize_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """An fp32 nn.Linear holding exactly the weights a 4-bit layer multiplies by."""
    if hasattr(getattr(module, "weight", None), "quant_state"):  # bitsandbytes Linear4bit
        import bitsandbytes as bnb

        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    elif hasattr(module, "qweight"):  # gptqmodel quant linear: dequantize_weight() is [in, out]
        weight = type(module).dequantize_weight(module).T
    else:
        weight = module.weight
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    linear.weight.data.copy_(weight.float())
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.float())
    return linear
