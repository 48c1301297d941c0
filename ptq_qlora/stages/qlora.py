"""Stage 3: QLoRA — LoRA trained on the frozen 4-bit model with the SFT data mix; the adapter
alone is saved and evaluated unmerged over the 4-bit base."""
from __future__ import annotations

import json
import logging
import os
from functools import partial

from ptq_qlora import distributed
from ptq_qlora.models.loading import load_tokenizer
from ptq_qlora.point_labels import qlora_label
from ptq_qlora.stages.context import JobContext, reuse_completed
from ptq_qlora.stages.lineage import option_applies, qlora_lineage, train_settings
from ptq_qlora.stages.refs import ModelRef, ref_from_stage_folder, save_ref
from ptq_qlora.training import train_causal_lm

log = logging.getLogger(__name__)


def trainable_quantized_model(qcfg, model_path, hardware, targets: list[str], settings: dict):
    """The 4-bit model at `model_path` loaded for training with a fresh adapter (LoRA, or QA-LoRA for
    that method) and the hardware profile's QLoRA options applied; returns (model, parameter counts).
    benchmarks/qlora_speed.py times this same function."""
    from ptq_qlora.adapters import (ADAPTERS_CAST_BY_TRL, adapters_in_bfloat16, attach_lora, dequantize_frozen_base,
                                    parameter_counts)
    from ptq_qlora.adapters.qalora import attach_qalora
    from ptq_qlora.quantizers import get_method, load_quantized
    from ptq_qlora.quantizers.common import parse_dtype

    model = load_quantized(qcfg, model_path, compute_dtype=hardware.dtype, for_training=True)
    adapter = get_method(qcfg.method).adapter  # lora, or qa-lora (pooled over the GPTQ groups)
    attach = partial(attach_qalora, group_size=qcfg.group_size) if adapter == "qa-lora" else attach_lora
    model = attach(model, targets, r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"],
                   gradient_checkpointing=hardware.gradient_checkpointing)
    if qcfg.method not in ADAPTERS_CAST_BY_TRL:  # TRL does it over bnb only (adapters/lora.py)
        log.info("adapter weights in bfloat16 over the %s base, as TRL keeps them over bnb: %d tensors",
                 qcfg.method, adapters_in_bfloat16(model))
    compute_dtype = parse_dtype(hardware.dtype)
    if distributed.strategy_for(hardware, peft=True) == "fsdp":
        from ptq_qlora.quantizers.bnb import use_float_quant_storage

        # FSDP shards the 4-bit weights only when stored as a float dtype (bnb_4bit_quant_storage)
        use_float_quant_storage(model, compute_dtype)
    counts = parameter_counts(model)
    if option_applies(hardware, "gptq_dequant_matmul", qcfg.method):
        from ptq_qlora.quantizers.gptq_frozen import use_frozen_dequant_matmul

        log.info("GPTQ base without saved 16-bit weights: %d layers (hardware.gptq_dequant_matmul)",
                 use_frozen_dequant_matmul(model))
    if option_applies(hardware, "dequantize_frozen_base"):
        layers = dequantize_frozen_base(model, compute_dtype)
        log.info("training over a dequantized copy of the 4-bit base (%d layers; hardware.dequantize_frozen_base)", layers)
    if option_applies(hardware, "fused_lora"):
        if distributed.strategy_for(hardware, peft=True) == "fsdp":  # FSDP2 shards the weights it would read
            log.warning("hardware.fused_lora is not used under FSDP: peft's LoRA forward")
        else:
            from ptq_qlora.adapters.fused_lora import fuse_lora_layers

            keep = option_applies(hardware, "keep_recomputed_weights")
            log.info("LoRA and its base in one autograd function: %d layers (hardware.fused_lora%s)",
                     fuse_lora_layers(model, keep_recomputed_weights=keep), ", keep_recomputed_weights" if keep else "")
    if option_applies(hardware, "compile_layers"):
        log.info("torch.compile on %d decoder layers (hardware.compile_layers; the first step compiles)",
                 compile_decoder_layers(model))
    return model, counts


def compile_decoder_layers(model) -> int:
    """torch.compile each repeated decoder block (the layers transformers checkpoints) in place, so the
    checkpoint's recomputation runs the compiled block too; returns the number of blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    import torch._dynamo

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # each block compiles its own graph (the fused LoRA functions carry that block's modules: 10 graphs
    # for 10 blocks on CPU); past the recompile limit (8 by default) the rest would silently run eager
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 2 * len(layers) + 8))
    for layer in layers:
        layer.compile()
    return len(layers)


def run_qlora(ctx: JobContext, parent: ModelRef) -> ModelRef:
    cfg = ctx.cfg
    if not parent.quantized:
        raise ValueError(
            f"QLoRA needs a 4-bit model, but {parent.label} ({parent.model_path}) is not quantized: "
            "choose quantizer=bnb-nf4 or quantizer=gptq-4bit, or point stage.input at a PTQ run"
        )
    lineage = qlora_lineage(cfg, parent.lineage, base_method=(parent.quantizer or {}).get("method"))
    reused = reuse_completed(ctx, "qlora", lineage, parent, metrics_prefix="qlora/train")
    if reused:
        return reused

    settings = train_settings(cfg, "qlora")
    targets = list(settings.get("target_modules") or cfg.model.lora_target_modules)
    with ctx.store.writing("qlora", lineage, {"parent": parent.to_json(), "train": settings}, force=cfg.force) as out:
        from omegaconf import OmegaConf

        qcfg = OmegaConf.create(parent.quantizer)
        model, counts = trainable_quantized_model(qcfg, parent.model_path, cfg.hardware, targets, settings)
        tokenizer = load_tokenizer(parent.model_path)
        log.info("QLoRA on %s: %s", parent.label, counts)
        metrics = train_causal_lm(
            model, tokenizer, ctx.data.train, cfg.model, settings, cfg.hardware, out, seed=cfg.seed,
            report_to=ctx.tracker.report_to if ctx.tracker else "none",
            max_length=cfg.data.max_input_tokens + cfg.data.max_output_tokens,
            run_name=f"qlora-{lineage}", save_dir=out / "adapter",  # rank 0 writes it when data-parallel
        )
        metrics.update(counts)
        ctx.store.drop_checkpoints(out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        base_rel = os.path.relpath(parent.model_path, ctx.store.final_dir("qlora", lineage))
        from ptq_qlora.quantizers import get_method

        adapter = get_method(qcfg.method).adapter
        label = qlora_label(parent.label).replace("+QLoRA", "+QA-LoRA" if adapter == "qa-lora" else "+QLoRA")
        save_ref(out, ModelRef("qlora", label, lineage, base_rel,
                               quantizer=parent.quantizer, adapter_path="adapter"))
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, prefix="qlora/train")
    ctx.log_stage_artifact("qlora", lineage, ctx.store.final_dir("qlora", lineage), parents=[parent])
    return ref_from_stage_folder(ctx.store.find("qlora", lineage))
