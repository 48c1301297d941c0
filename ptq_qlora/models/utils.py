"""Parameter counts and sizes (in memory and on disk), logged by every stage and reported next to
the paper's tables. 4-bit layers are counted at their logical size for parameters and at their
real (packed) size for bytes."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def _bnb_quant_state(tensor):
    """bitsandbytes' Params4bit keeps its original shape and scales in `.quant_state`."""
    return getattr(tensor, "quant_state", None)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor once. A bnb 4-bit weight counts its
    original shape (torch sees it as packed bytes); a GPTQ layer keeps its weight in buffers
    (`qweight`), so it is counted from in_features x out_features, as frozen."""
    trainable = total = 0
    for p in model.parameters():
        state = _bnb_quant_state(p)
        n = math.prod(state.shape) if state is not None and getattr(state, "shape", None) else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():
        packed = getattr(module, "qweight", None)
        if isinstance(packed, torch.Tensor) and not isinstance(packed, torch.nn.Parameter):
            total += int(getattr(module, "in_features", 0)) * int(getattr(module, "out_features", 0))
    return trainable, total


def _quant_state_tensors(state) -> list[torch.Tensor]:
    found = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)  # double quantization: the absmax are quantized too
    if nested is not None:
        found += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in found if isinstance(t, torch.Tensor)]


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes the model holds in memory: parameters, buffers (GPTQ's packed qweight/qzeros/scales
    live there) and bnb 4-bit scales, each storage counted once (tied embeddings, shared tables)."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal size
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes) if tensor.device.type != "meta" else (id(tensor), nbytes)
        if key not in seen:
            seen.add(key)
            size += nbytes

    for p in model.parameters():
        add(p)  # a Params4bit is uint8 packed: numel x 1 byte is its real size
        state = _bnb_quant_state(p)
        for t in _quant_state_tensors(state) if state is not None else []:
            add(t)
    for b in model.buffers():
        add(b)
    return size


def folder_size_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path` (a checkpoint folder on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
