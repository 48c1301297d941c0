"""Stage 3b (QA-LoRA): fold the QLoRA stage's adapter into its low-bit base with the quantizer's
`merge` (quantizers/qalora_merge.py), into `merge-<lineage>/model`: a low-bit checkpoint with no
16-bit copy, evaluated as `QA-LoRA-merged-<bits>bit` next to the unmerged point. Methods without a
`merge` (bnb, gptq) keep their adapter separate and have no merge stage."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ptq_qlora.models.loading import load_tokenizer
from ptq_qlora.point_labels import NO_SFT
from ptq_qlora.runstore import lineage_of
from ptq_qlora.stages.context import JobContext, reuse_completed
from ptq_qlora.stages.refs import ModelRef, ref_from_stage_folder, save_ref

log = logging.getLogger(__name__)


def merge_method(ref: ModelRef):
    """The quantization method whose `merge` folds this ref's adapter, or None."""
    if ref.point != "qlora" or not ref.adapter_path or not ref.quantized:
        return None
    from ptq_qlora.quantizers import get_method

    method = get_method(ref.quantizer["method"])
    return method if method.merge is not None else None


def merge_label(parent: ModelRef) -> str:
    return f"QA-LoRA-merged-{int(parent.quantizer['bits'])}bit" + (NO_SFT if parent.label.endswith(NO_SFT) else "")


def with_merge_point(points, refs: dict) -> list[str]:
    """Evaluation points with `merge` right after `qlora` when this job produced a merged model."""
    points = list(points)
    if "merge" in refs and "qlora" in points and "merge" not in points:
        points.insert(points.index("qlora") + 1, "merge")
    return points


def run_merge(ctx: JobContext, parent: ModelRef) -> ModelRef:
    from ptq_qlora.quantizers.common import parse_dtype, write_greedy_generation_config

    cfg = ctx.cfg
    method = merge_method(parent)
    if method is None:
        raise ValueError(f"{parent.label} has no adapter that its quantizer can merge into the low-bit weights")
    lineage = lineage_of(parent.lineage, stage="merge", dtype=cfg.hardware.dtype)
    reused = reuse_completed(ctx, "merge", lineage, parent, metrics_prefix="merge")
    if reused:
        return reused
    label = merge_label(parent)
    with ctx.store.writing("merge", lineage, {"parent": parent.to_json()}, force=cfg.force) as out:
        model_dir = out / "model"
        stats = method.merge(OmegaConf.create(parent.quantizer), Path(parent.model_path), Path(parent.adapter_path),
                             model_dir, parse_dtype(cfg.hardware.dtype))
        load_tokenizer(parent.model_path).save_pretrained(str(model_dir))
        write_greedy_generation_config(model_dir, Path(parent.model_path))
        (out / "metrics.json").write_text(json.dumps(stats, indent=2, default=str))
        # the merged checkpoint loads with the method named by its format (hqq), not the base's
        quantizer = {**parent.quantizer, "method": stats["format"], "label": label}
        save_ref(out, ModelRef("merge", label, lineage, "model", quantizer=quantizer))
    ctx.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))}, prefix="merge")
    ctx.log_stage_artifact("merge", lineage, ctx.store.final_dir("merge", lineage), parents=[parent])
    return ref_from_stage_folder(ctx.store.find("merge", lineage))
