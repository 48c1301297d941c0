"""Evaluation at any point of the chain: batched greedy generation on the test split, metrics,
per-example scores (for paired tests) and predictions, stored by lineage like any stage."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ptq_qlora import distributed
from ptq_qlora.generation import generate_batched
from ptq_qlora.metrics import alignscore, compute_metrics
from ptq_qlora.models.prompting import completion_suffix, render_prompt
from ptq_qlora.provenance import provenance
from ptq_qlora.stages.context import JobContext
from ptq_qlora.stages.lineage import eval_lineage
from ptq_qlora.stages.loaders import load_for_inference
from ptq_qlora.stages.refs import ModelRef

log = logging.getLogger(__name__)


def run_eval(ctx: JobContext, ref: ModelRef) -> dict:
    """Evaluate `ref` on the task's eval split; returns the metrics dict (reused if stored)."""
    cfg = ctx.cfg
    alignscore_settings = alignscore.settings_of(cfg.task)  # None unless a checkpoint is set; checks it exists
    lineage = eval_lineage(cfg, ref.lineage)
    found = None if cfg.force else ctx.store.find("eval", lineage)
    if found:
        log.info("evaluation of %s reused from %s", ref.label, found.path)
        _track(ctx, ref, lineage, found.path, found.metrics, reused=True)
        return found.metrics

    split = getattr(ctx.data, cfg.eval.split)
    max_new_tokens = cfg.eval.max_new_tokens or cfg.task.max_new_tokens
    batch_size = cfg.eval.batch_size or cfg.hardware.eval_batch_size
    with ctx.store.writing("eval", lineage, {"model": ref.to_json()}, force=cfg.force) as out:
        # loaded before generation (on CPU), so a bad checkpoint or a missing backbone fails now
        scorer = None
        if alignscore_settings and distributed.is_main_process():
            scorer = alignscore.load_alignscore(alignscore_settings["checkpoint"], alignscore_settings["backbone"],
                                                alignscore_settings["batch_size"])
        model, tokenizer = load_for_inference(cfg, ref)
        if cfg.hardware.device == "cuda" and not ref.quantized:  # 4-bit loads are placed by device_map
            model.to(distributed.local_device())
        prompts = [render_prompt(tokenizer, cfg.model, p) for p in split["prompt"]]
        # chat models whose turn end differs from eos must still stop at the turn end
        suffix = completion_suffix(tokenizer, cfg.model)
        stop = [suffix] if suffix != tokenizer.eos_token else None
        started = time.time()
        # 4-bit bases on CPU must not see inference_mode (their LoRA gradients go wrong later
        # in the same process); no_grad is as fast for generation.
        # Several GPUs: each rank generates its contiguous shard, all shards are gathered in order.
        predictions = distributed.shard_and_gather(prompts, lambda shard: generate_batched(
            model, tokenizer, shard, max_new_tokens=max_new_tokens, batch_size=batch_size,
            inference_mode=not ref.quantized, stop_strings=stop, desc=f"eval {ref.label}",
        ))
        seconds = time.time() - started
        metrics = summary = None
        if distributed.is_main_process():  # rank 0 scores and writes; the others get its metrics
            references = list(split["reference"])
            summary, per_example = compute_metrics(ctx.data.kind, predictions, references, ctx.data.labels)
            if scorer is not None:
                summary.update(_alignscore(cfg, scorer, alignscore_settings, split["prompt"], predictions, per_example))
            with open(out / "predictions.jsonl", "w") as f:
                for row_id, pred, gold, scores in zip(split["id"], predictions, references, per_example):
                    f.write(json.dumps({"id": row_id, "prediction": pred, "reference": gold, **scores}) + "\n")
            metrics = {
                **summary,
                "model": ref.to_json(),
                "task": cfg.task.name,
                "split": cfg.eval.split,
                "n_examples": len(split),
                "generation": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
                "eval_seconds": seconds,
                "examples_per_second": len(split) / seconds if seconds else None,
                "processes": distributed.world_size(),
                **provenance(cfg),
            }
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        summary, metrics = distributed.broadcast_object((summary, metrics))
    _track(ctx, ref, lineage, ctx.store.final_dir("eval", lineage), metrics, reused=False)
    return metrics


def _alignscore(cfg, scorer, settings: dict, prompts, predictions: list[str], per_example: list[dict]) -> dict:
    """Each prediction's AlignScore against its task input (the dialogue), into `per_example`;
    returns the summary entries."""
    device = settings["device"] or (distributed.local_device() if cfg.hardware.device == "cuda" else "cpu")
    contexts = [alignscore.context_from_prompt(cfg.task.prompt_template, p) for p in prompts]
    started = time.time()
    summary, scores = alignscore.score_predictions(scorer.to(device), contexts, predictions)
    summary["alignscore_setup"]["seconds"] = time.time() - started
    for row, score in zip(per_example, scores):
        row["alignscore"] = score
    return summary


def _track(ctx: JobContext, ref: ModelRef, lineage: str, folder, metrics: dict, reused: bool) -> None:
    """Metrics (the record's scalars but the seed), the per-example predictions table and the
    eval folder as an artifact."""
    if ctx.tracker is None:
        return
    ctx.log_metrics({k: v for k, v in metrics.items() if k != "seed"}, prefix=f"eval/{ref.point}", reused=reused)
    with open(Path(folder) / "predictions.jsonl") as f:
        ctx.log_predictions(ref.point, [json.loads(line) for line in f if line.strip()], reused=reused)
    ctx.log_stage_artifact("eval", lineage, folder, parents=[ref], reused=reused)
