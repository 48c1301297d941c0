"""Quantization methods by name. A method is one module in this package that calls `register(...)`.

Method modules import their heavy libraries (gptqmodel, bitsandbytes) inside functions, so scanning
the package to fill the registry is cheap and importing gptqmodel happens only when GPTQ is used.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.registry import Registry

# validate(qcfg, src_dir, tokenizer, calibration_texts): method-specific checks, before any long work.
Validate = Callable[[QuantizerConfig, Path, Any, list[str]], None]
# quantize(qcfg, src_dir, out_dir, tokenizer, calibration_texts, compute_dtype) -> in-memory model;
# writes weights + config.json into out_dir (tokenizer and generation config are the caller's job).
Quantize = Callable[[QuantizerConfig, Path, Path, Any, list[str], torch.dtype], torch.nn.Module]
# load(qcfg, path, compute_dtype, for_training, device_map) -> model
Load = Callable[[QuantizerConfig, Path, torch.dtype, bool, Any], torch.nn.Module]
# describe(qcfg) -> the settings of this method worth recording next to its results
Describe = Callable[[QuantizerConfig], dict]
# merge(qcfg, base_dir, adapter_dir, out_dir, compute_dtype) -> stats: writes the adapter folded into a
# low-bit checkpoint (QA-LoRA); methods without one keep the adapter separate.
Merge = Callable[[QuantizerConfig, Path, Path, Path, torch.dtype], dict]


@dataclass(frozen=True)
class QuantMethod:
    name: str
    supported_bits: tuple[int, ...]
    validate: Validate
    quantize: Quantize
    load: Load
    needs_calibration: bool = False
    describe: Describe = field(default=lambda qcfg: {})
    adapter: str = "lora"  # what the QLoRA stage trains on this base: lora | qa-lora
    merge: Optional[Merge] = None


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method")
_NOT_METHOD_MODULES = {"api", "common", "config", "qalora_merge", "registry", "testing", "training_safety"}
_scanned = False


def register(method: QuantMethod) -> QuantMethod:
    return QUANT_METHODS.register(method.name)(method)


def _import_method_modules() -> None:
    global _scanned
    if _scanned:
        return
    package = importlib.import_module("ptq_qlora.quantizers")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHOD_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"ptq_qlora.quantizers.{info.name}")
    _scanned = True


def get_method(name: str) -> QuantMethod:
    _import_method_modules()
    return QUANT_METHODS.get(name)  # unknown names raise KeyError listing the known ones


def method_names() -> list[str]:
    _import_method_modules()
    return QUANT_METHODS.names()
