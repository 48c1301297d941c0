"""Evaluation at any point of the chain: batched greedy generation on the test split, metrics,
per-example scores (for paired tests) and predictions, stored by lineage like any stage."""
from __future__ import annotations

import json
import logging
import time

from ptq_qlora.generation import generate_batched
from ptq_qlora.metrics import compute_metrics
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
    lineage = eval_lineage(cfg, ref.lineage)
    found = None if cfg.force else ctx.store.find("eval", lineage)
    if found:
        log.info("evaluation of %s reused from %s", ref.label, found.path)
        return found.metrics

    split = getattr(ctx.data, cfg.eval.split)
    max_new_tokens = cfg.eval.max_new_tokens or cfg.task.max_new_tokens
    batch_size = cfg.eval.batch_size or cfg.hardware.eval_batch_size
    with ctx.store.writing("eval", lineage, {"model": ref.to_json()}, force=cfg.force) as out:
        model, tokenizer = load_for_inference(cfg, ref)
        prompts = [render_prompt(tokenizer, cfg.model, p) for p in split["prompt"]]
        # chat models whose turn end differs from eos must still stop at the turn end
        suffix = completion_suffix(tokenizer, cfg.model)
        stop = [suffix] if suffix != tokenizer.eos_token else None
        started = time.time()
        # 4-bit bases on CPU must not see inference_mode (their LoRA gradients go wrong later
        # in the same process); no_grad is as fast for generation.
        predictions = generate_batched(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            inference_mode=not ref.quantized, stop_strings=stop, desc=f"eval {ref.label}",
        )
        seconds = time.time() - started
        references = list(split["reference"])
        summary, per_example = compute_metrics(ctx.data.kind, predictions, references, ctx.data.labels)
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
            **provenance(cfg),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    ctx.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, prefix=f"eval/{ref.point}")
    return metrics
