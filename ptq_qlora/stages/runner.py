"""One job: run the chain base -> sft -> ptq -> qlora up to `stage.target` (reusing completed
stages by lineage), evaluate the requested points, print and save the table. `stage.skip_sft`
drops the SFT step (base -> ptq -> qlora: the no-SFT ablation)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import set_seed

from ptq_qlora.data import load_task_data
from ptq_qlora.models.loading import load_tokenizer, materialize_source
from ptq_qlora.report.table import format_table
from ptq_qlora.runstore import RunStore, is_stage_folder, read_record
from ptq_qlora.stages.context import JobContext
from ptq_qlora.stages.evaluate import run_eval
from ptq_qlora.stages.lineage import base_lineage
from ptq_qlora.stages.merge import with_merge_point
from ptq_qlora.stages.refs import ModelRef, ref_from_stage_folder

log = logging.getLogger(__name__)

CHAIN = ("sft", "ptq", "qlora")


def _step_functions():
    # imported lazily: the PTQ/QLoRA stages pull in quantization libraries
    from ptq_qlora.distributed import main_process_only
    from ptq_qlora.stages.ptq import run_ptq
    from ptq_qlora.stages.qlora import run_qlora
    from ptq_qlora.stages.sft import run_sft

    # quantization is one-GPU work: under a multi-GPU launch rank 0 does it, the others wait for it
    return {"sft": run_sft, "ptq": main_process_only(run_ptq), "qlora": run_qlora}


def start_ref(cfg) -> ModelRef:
    """Where the chain starts: the model config's weights, or `stage.input` (a completed
    run-store folder, a model folder or a Hub id)."""
    given = cfg.stage.input
    if given is None:
        path = materialize_source(cfg.model)
        return ModelRef("base", "base", base_lineage(cfg), path)
    if Path(given).exists() and is_stage_folder(given):
        return ref_from_stage_folder(read_record(given))  # refuses an unfinished folder
    path = materialize_source(cfg.model, path=given)  # a model folder or Hub id; errors if neither
    return ModelRef("input", "input", base_lineage(cfg, source=str(Path(path).resolve()) if Path(path).exists() else path), path)


def steps_to_run(target: str | None, start: ModelRef, skip_sft: bool = False) -> list[str]:
    if target is None:
        return []
    if target not in CHAIN:
        raise ValueError(f"unknown stage target {target!r}; known: {', '.join(CHAIN)}")
    if skip_sft:
        return _steps_without_sft(target, start)
    if start.point in CHAIN:
        first = CHAIN.index(start.point) + 1
    elif start.point == "input" and target != "sft":
        first = CHAIN.index("ptq")  # a given model stands in for the SFT model: quantize it
    else:
        first = 0
    steps = list(CHAIN[first : CHAIN.index(target) + 1])
    if not steps and start.point != target:
        raise ValueError(f"stage.input is a {start.point} run, which comes after {target}; nothing to do")
    return steps


def _steps_without_sft(target: str, start: ModelRef) -> list[str]:
    """The no-SFT ablation: PTQ (and QLoRA) of the model config's base weights."""
    if start.point != "base":
        raise ValueError(f"stage.skip_sft=true quantizes the model config's base weights, but stage.input "
                         f"names a {start.point} model; drop stage.input (or stage.skip_sft)")
    if target == "sft":
        raise ValueError("stage.skip_sft=true with stage.target=sft leaves nothing to run; use target ptq or qlora")
    return list(CHAIN[CHAIN.index("ptq") : CHAIN.index(target) + 1])


def check_quantizer_early(ctx: JobContext, start: ModelRef) -> None:
    """Fail on a bad quantizer setting (group size vs layer widths, too few calibration samples)
    before SFT spends hours: SFT does not change the shapes the checks look at."""
    if ctx.cfg.quantizer.method == "none" or not (Path(start.model_path) / "config.json").exists():
        return
    from ptq_qlora.quantizers import validate
    from ptq_qlora.stages.ptq import calibration_texts

    tokenizer = load_tokenizer(start.model_path)
    count = int(ctx.cfg.quantizer.get("calibration_samples") or 0)
    validate(ctx.cfg.quantizer, start.model_path, tokenizer, calibration_texts(ctx, tokenizer, count))


def run_job(cfg, tracker=None) -> dict:
    set_seed(cfg.seed)
    start = start_ref(cfg)
    steps = steps_to_run(cfg.stage.target, start, skip_sft=cfg.stage.skip_sft)
    data = load_task_data(cfg.task, cfg.data, tokenizer=load_tokenizer(start.model_path))
    log.info("task %s: %s", cfg.task.name, json.dumps(data.stats, default=str))
    ctx = JobContext(cfg, RunStore(cfg.paths.store), data, tracker)

    if "ptq" in steps:
        check_quantizer_early(ctx, start)
    if cfg.eval.enabled and cfg.stage.eval_points:
        from ptq_qlora.metrics import alignscore

        alignscore.settings_of(cfg.task)  # a configured AlignScore checkpoint must exist before any training
    refs = {start.point: start, "input": start}
    if start.point == "input":
        refs["base"] = start
    previous = start
    functions = _step_functions() if steps else {}
    for step in steps:
        previous = refs[step] = functions[step](ctx, previous)
    if "qlora" in steps:
        _merge_if_supported(ctx, refs)

    results = {}
    if cfg.eval.enabled:
        for point in with_merge_point(cfg.stage.eval_points, refs):
            if point not in refs:
                raise ValueError(f"eval point {point!r} is not produced by this job (has: {', '.join(refs)})")
            results[refs[point].label] = run_eval(ctx, refs[point])

    summary = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "quantizer": cfg.quantizer.name,
        "stages": {point: ref.to_json() for point, ref in refs.items()},
        "results": results,
        "data_stats": data.stats,
    }
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    if results:
        table = format_table(results, metric_names=list(cfg.task.metrics), title=f"{cfg.model.name} on {cfg.task.name}")
        print(table)
        (out_dir / "results.md").write_text(table + "\n")
    return summary


def _merge_if_supported(ctx: JobContext, refs: dict) -> None:
    """QA-LoRA: fold the trained adapter into the low-bit base (one-process work, like PTQ)."""
    from ptq_qlora.distributed import main_process_only
    from ptq_qlora.stages.merge import merge_method, run_merge

    if merge_method(refs["qlora"]) is not None:
        refs["merge"] = main_process_only(run_merge)(ctx, refs["qlora"])


PRIMARY_METRIC = {"classification": "f1_micro", "generation": "rougeL"}


def objective(summary: dict, cfg) -> float | None:
    """The number Hydra sweepers optimise: the primary metric of the last evaluated model."""
    if not summary["results"]:
        return None
    last = list(summary["results"].values())[-1]
    kind = cfg.task.kind
    return last.get(PRIMARY_METRIC.get(kind, ""))
