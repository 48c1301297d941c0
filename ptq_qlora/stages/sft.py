"""Stage 1: full-parameter SFT of the base model on the task + general-instruction mix."""
from __future__ import annotations

import json
import logging

from omegaconf import OmegaConf

from ptq_qlora.models.loading import load_model_and_tokenizer
from ptq_qlora.models.utils import count_parameters
from ptq_qlora.runstore import RunStore
from ptq_qlora.stages.context import JobContext, reuse_completed
from ptq_qlora.stages.lineage import sft_lineage, train_settings
from ptq_qlora.stages.refs import ModelRef, ref_from_stage_folder, save_ref
from ptq_qlora.training import train_causal_lm

log = logging.getLogger(__name__)


def run_sft(ctx: JobContext, parent: ModelRef) -> ModelRef:
    cfg = ctx.cfg
    lineage = sft_lineage(cfg, parent.lineage)
    reused = reuse_completed(ctx, "sft", lineage, parent, metrics_prefix="sft/train")
    if reused:
        return reused

    settings = train_settings(cfg, "sft")
    meta = {"parent": parent.to_json(), "train": settings, "config": OmegaConf.to_container(cfg, resolve=True)}
    with ctx.store.writing("sft", lineage, meta, force=cfg.force) as out:
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, dtype=cfg.hardware.train_dtype, path=parent.model_path,
            attn_implementation=cfg.hardware.attn_implementation,
        )
        trainable, total = count_parameters(model)
        log.info("full SFT of %s: %d/%d trainable parameters, %d train rows",
                 parent.model_path, trainable, total, len(ctx.data.train))
        metrics = train_causal_lm(
            model, tokenizer, ctx.data.train, cfg.model, settings, cfg.hardware, out, seed=cfg.seed,
            report_to=ctx.tracker.report_to if ctx.tracker else "none",
            max_length=cfg.data.max_input_tokens + cfg.data.max_output_tokens,
            run_name=f"sft-{lineage}", save_dir=out / "model",  # gathered into one folder under FSDP
        )
        metrics["trainable_parameters"] = trainable
        tokenizer.save_pretrained(out / "model")
        RunStore.drop_checkpoints(out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        ref = ModelRef("sft", "SFT-16bit", lineage, "model")
        save_ref(out, ref)
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, prefix="sft/train")
    ctx.log_stage_artifact("sft", lineage, ctx.store.final_dir("sft", lineage), parents=[parent])
    return ref_from_stage_folder(ctx.store.find("sft", lineage))
