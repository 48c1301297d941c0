"""Load the model a ModelRef names: 16-bit weights, a quantized checkpoint, or a quantized base
with its LoRA adapter kept unmerged (PEFT cannot merge into GPTQ; into NF4 it is lossy)."""
from __future__ import annotations

from omegaconf import OmegaConf

from ptq_qlora.models.loading import load_model_and_tokenizer, load_tokenizer
from ptq_qlora.stages.refs import ModelRef


def load_for_inference(cfg, ref: ModelRef):
    if not ref.quantized:
        return load_model_and_tokenizer(
            cfg.model, dtype=cfg.hardware.dtype, path=ref.model_path,
            attn_implementation=cfg.hardware.attn_implementation,
        )
    from ptq_qlora.quantizers import load_quantized

    qcfg = OmegaConf.create(ref.quantizer)
    model = load_quantized(qcfg, ref.model_path, compute_dtype=cfg.hardware.dtype, for_training=False)
    tokenizer = load_tokenizer(ref.model_path)
    if ref.adapter_path:
        from ptq_qlora.adapters import load_adapter

        model = load_adapter(model, ref.adapter_path)
    return model, tokenizer
