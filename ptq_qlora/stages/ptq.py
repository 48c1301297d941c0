"""Stage 2: post-training quantization of the SFT model (bnb NF4/FP4, GPTQ 2/3/4/8-bit), or of the
base model in the no-SFT ablation."""
from __future__ import annotations

import json
import logging
import random

from omegaconf import OmegaConf

from ptq_qlora.models.loading import load_tokenizer
from ptq_qlora.models.prompting import render_prompt
from ptq_qlora.point_labels import ptq_label
from ptq_qlora.stages.context import JobContext, reuse_completed
from ptq_qlora.stages.lineage import ptq_lineage
from ptq_qlora.stages.refs import ModelRef, ref_from_stage_folder, save_ref

log = logging.getLogger(__name__)


def calibration_texts(ctx: JobContext, tokenizer, count: int) -> list[str]:
    """GPTQ calibration samples: rendered prompt + answer of task training rows (seeded)."""
    rows = [r for r in ctx.data.train if r["source"] == "task"]
    random.Random(ctx.cfg.seed).shuffle(rows)
    return [render_prompt(tokenizer, ctx.cfg.model, r["prompt"]) + r["completion"] for r in rows[:count]]


def run_ptq(ctx: JobContext, parent: ModelRef) -> ModelRef:
    from ptq_qlora.quantizers import quantize

    cfg = ctx.cfg
    qcfg = cfg.quantizer
    if qcfg.method == "none":
        log.info("quantizer=none: the PTQ point is the 16-bit model itself")
        return parent
    lineage = ptq_lineage(cfg, parent.lineage)
    reused = reuse_completed(ctx, "ptq", lineage, parent, metrics_prefix="ptq")
    if reused:
        return reused

    tokenizer = load_tokenizer(parent.model_path)
    texts = calibration_texts(ctx, tokenizer, int(qcfg.get("calibration_samples") or 0))
    qplain = OmegaConf.to_container(qcfg, resolve=True)
    meta = {"parent": parent.to_json(), "quantizer": qplain}
    from_base = parent.point == "base"  # the no-SFT ablation (stage.skip_sft): the base model quantized
    if from_base:
        meta["model_name"] = cfg.model.name  # no SFT stage upstream to name the model for the report
    with ctx.store.writing("ptq", lineage, meta, force=cfg.force) as out:
        # quantize() validates the source, group sizes and calibration count before long work
        stats = quantize(qcfg, parent.model_path, out / "model", tokenizer, texts, compute_dtype=cfg.hardware.dtype)
        (out / "metrics.json").write_text(json.dumps(stats, indent=2, default=str))
        save_ref(out, ModelRef("ptq", ptq_label(qcfg.label, from_base), lineage, "model", quantizer=qplain))
    ctx.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))}, prefix="ptq")
    ctx.log_stage_artifact("ptq", lineage, ctx.store.final_dir("ptq", lineage), parents=[parent])
    return ref_from_stage_folder(ctx.store.find("ptq", lineage))
