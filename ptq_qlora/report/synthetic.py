"""A synthetic run store in the real on-disk layout, for tests, the notebook and trying the report
without training anything. Folders are written by hand exactly as the stages write them:

    <store>/sft-<lin>/   stage.json (parent ref, config.model.name, kind, lineage, finished_at), completed
    <store>/ptq-<lin>/   stage.json (parent ref, quantizer), completed
    <store>/qlora-<lin>/ stage.json (parent ref, train), completed
    <store>/eval-<lin>/  stage.json (model ref, kind, lineage, finished_at), completed, metrics.json,
                         predictions.jsonl (id, prediction, reference, per-example scores)

No weights are written: the report never reads them.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from ptq_qlora.point_labels import parse as parse_label
from ptq_qlora.point_labels import ptq_label, qlora_label
from ptq_qlora.runstore import COMPLETED, META, lineage_of

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
QUANTIZERS = {
    "bnb": {"name": "bnb-nf4", "method": "bnb", "label": "PTQ-BNB-4bit", "bits": 4, "quant_type": "nf4"},
    "gptq": {"name": "gptq-4bit", "method": "gptq", "label": "PTQ-GPTQ-4bit", "bits": 4, "group_size": 128},
}


def gptq_quantizer(bits: int) -> dict:
    """The resolved conf/quantizer/gptq-<bits>bit config (the parts the report reads)."""
    return {**QUANTIZERS["gptq"], "name": f"gptq-{bits}bit", "label": f"PTQ-GPTQ-{bits}bit", "bits": bits}


def bnb_quantizer(quant_type: str) -> dict:
    label = "PTQ-BNB-4bit" if quant_type == "nf4" else f"PTQ-BNB-{quant_type.upper()}-4bit"
    return {**QUANTIZERS["bnb"], "name": f"bnb-{quant_type}", "label": label, "quant_type": quant_type}
TASKS = {"bitext": "classification", "dialogsum": "generation"}


def ref(point: str, label: str, lineage: str, quantizer: dict | None = None, model_path: str = "model") -> dict:
    """A model ref as `ModelRef.to_json()` writes it."""
    return {"point": point, "label": label, "lineage": lineage, "model_path": model_path,
            "quantizer": quantizer, "adapter_path": "adapter" if point == "qlora" else None}


def write_stage(store: Path, kind: str, lineage: str, meta: dict, finished_at: float | None = None,
                completed: bool = True, partial: bool = False) -> Path:
    """A stage folder (`.partial-` and without marker when unfinished)."""
    folder = Path(store) / (f".partial-{kind}-{lineage}" if partial else f"{kind}-{lineage}")
    folder.mkdir(parents=True, exist_ok=True)
    finished_at = time.time() if finished_at is None else finished_at
    full = {**meta, "kind": kind, "lineage": lineage, "finished_at": finished_at}
    (folder / META).write_text(json.dumps(full, indent=2))
    if completed and not partial:
        (folder / COMPLETED).write_text("")
    return folder


def summarise(kind: str, rows: list[dict]) -> dict:
    """Summary metrics consistent with the per-example scores (every prediction parsed)."""
    n = len(rows)
    if kind == "classification":
        acc = sum(r["correct"] for r in rows) / n
        return {"precision": acc, "recall": acc, "f1_micro": acc, "accuracy": acc, "n": n, "n_unparsed": 0}
    return {**{k: sum(r[k] for r in rows) / n for k in ROUGE}, "n": n}


def write_eval(store: Path, model_ref: dict, task: str, predictions: list[dict], *, kind: str | None = None,
               lineage: str | None = None, finished_at: float | None = None, completed: bool = True,
               partial: bool = False, extra_metrics: dict | None = None) -> Path:
    """An eval folder for `model_ref` on `task`: `predictions` rows need `id` and the per-example
    scores (`correct`, or rouge1/2/L/Lsum); summary metrics are their means."""
    kind = kind or TASKS.get(task, "classification")
    lineage = lineage or lineage_of(model_ref["lineage"], stage="eval", task=task)
    folder = write_stage(store, "eval", lineage, {"model": model_ref}, finished_at, completed, partial)
    with open(folder / "predictions.jsonl", "w") as f:
        for row in predictions:
            f.write(json.dumps({"prediction": "p", "reference": "r", **row}) + "\n")
    metrics = {**summarise(kind, predictions), **(extra_metrics or {}), "model": model_ref, "task": task,
               "split": "test", "n_examples": len(predictions),
               "generation": {"greedy": True, "max_new_tokens": 8, "batch_size": 4},
               "eval_seconds": 1.0, "examples_per_second": float(len(predictions)), "seed": 42}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def write_chain(store: Path, model: str, methods=("bnb", "gptq"), finished_at: float = 1.7e9,
                quantizers: list[dict] | None = None, no_sft: list[dict] = ()) -> dict[str, dict]:
    """base -> sft -> ptq -> qlora stage folders for `model`, one PTQ (+QLoRA) per quantizer
    (`quantizers`, default: the 4-bit config of each of `methods`), and for each of `no_sft` the
    ablation's base -> ptq -> qlora (labels marked "(no SFT)", the PTQ meta naming the model as
    the stage writes it). Returns label -> model ref."""
    base = ref("base", "base", lineage_of(None, model=model), model_path=f"/cache/{model}")
    sft_lin = lineage_of(base["lineage"], stage="sft")
    sft = ref("sft", "SFT-16bit", sft_lin)
    write_stage(store, "sft", sft_lin, {"parent": base, "train": {"lr": 1e-4},
                                        "config": {"model": {"name": model, "notes": f"synthetic {model}"}}},
                finished_at)
    refs = {"base": base, "SFT-16bit": sft}
    chains = [(sft, q) for q in (quantizers if quantizers is not None else [QUANTIZERS[m] for m in methods])]
    chains += [(base, q) for q in no_sft]
    for parent, quantizer in chains:
        from_base = parent["point"] == "base"
        ptq_lin = lineage_of(parent["lineage"], stage="ptq", quantizer=quantizer)
        ptq = ref("ptq", ptq_label(quantizer["label"], from_base), ptq_lin, quantizer)
        meta = {"parent": parent, "quantizer": quantizer, **({"model_name": model} if from_base else {})}
        write_stage(store, "ptq", ptq_lin, meta, finished_at)
        qlora_lin = lineage_of(ptq_lin, stage="qlora")
        write_stage(store, "qlora", qlora_lin, {"parent": ptq, "train": {"lr": 2e-4}}, finished_at)
        refs[ptq["label"]] = ptq
        refs[qlora_label(ptq["label"])] = ref("qlora", qlora_label(ptq["label"]), qlora_lin, quantizer)
    return refs


def classification_rows(task: str, accuracy: float, n: int, rng: random.Random) -> list[dict]:
    return [{"id": f"{task}/test/{i}", "correct": int(rng.random() < accuracy)} for i in range(n)]


def generation_rows(task: str, level: float, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        rl = min(1.0, max(0.0, rng.gauss(level, 0.08)))
        rows.append({"id": f"{task}/test/{i}", "rouge1": min(1.0, rl + 0.1), "rouge2": max(0.0, rl - 0.12),
                     "rougeL": rl, "rougeLsum": min(1.0, rl + 0.02)})
    return rows


# accuracy / ROUGE-L level per point: PTQ a little below SFT, QLoRA above PTQ
LEVELS = {"base": 0.1, "SFT-16bit": 0.7, "PTQ-BNB-4bit": 0.62, "PTQ-BNB-4bit+QLoRA": 0.78,
          "PTQ-GPTQ-4bit": 0.6, "PTQ-GPTQ-4bit+QLoRA": 0.75}
# other widths / formats: the 4-bit level of the method moved by the width (fewer bits, lower),
# QLoRA's gain growing as the PTQ loss grows; the no-SFT ablation well below the SFT-based chain
BITS_SHIFT = {2: -0.35, 3: -0.12, 4: 0.0, 8: 0.06}


def level(label: str) -> float:
    if label in LEVELS:
        return LEVELS[label]
    p = parse_label(label)
    four_bit = f"PTQ-{p.method}-4bit"
    value = LEVELS.get(four_bit, 0.6) + BITS_SHIFT.get(p.bits, 0.0) - (0.02 if p.variant else 0.0)
    if p.qlora:
        value += 0.15 - 0.5 * BITS_SHIFT.get(p.bits, 0.0)
    if p.no_sft:
        value -= 0.25
    return min(0.95, max(0.05, value))


@dataclass
class SyntheticStore:
    root: Path
    models: list[str]
    tasks: list[str]
    refs: dict[str, dict[str, dict]]  # model -> label -> ref
    evals: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (model, label, task) -> shown folder
    superseded: list[Path] = field(default_factory=list)  # older duplicates (newest-wins drops them)
    unfinished: list[Path] = field(default_factory=list)
    malformed: list[Path] = field(default_factory=list)


def build_synthetic_store(root: str | Path, models=("smollm2-135m", "tiny-random"), tasks=("bitext", "dialogsum"),
                          n_examples: int = 40, seed: int = 0, with_base: bool = True,
                          with_noise: bool = True, gptq_bits=(4,), bnb_quant_types=("nf4",),
                          no_sft_methods=()) -> SyntheticStore:
    """Chains for `models`, evaluated at every point on every task: GPTQ at each of `gptq_bits`,
    bnb at each of `bnb_quant_types`, and the no-SFT ablation for each of `no_sft_methods` (its
    4-bit default quantizer). `with_noise` adds an older duplicate of one evaluation, a
    `.partial-eval-*` folder, an eval folder without the `completed` marker and one with a broken
    metrics.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    info = SyntheticStore(root, list(models), list(tasks), {})
    t0 = 1.7e9
    for m_index, model in enumerate(models):
        quantizers = [bnb_quantizer(t) for t in bnb_quant_types] + [gptq_quantizer(b) for b in gptq_bits]
        refs = info.refs[model] = write_chain(root, model, finished_at=t0, quantizers=quantizers,
                                              no_sft=[QUANTIZERS[m] for m in no_sft_methods])
        for task in tasks:
            kind = TASKS.get(task, "classification")
            for label, model_ref in refs.items():
                if label == "base" and not with_base:
                    continue
                value = level(label) - 0.05 * m_index
                make = classification_rows if kind == "classification" else generation_rows
                rows = make(task, value, n_examples, rng)
                info.evals[(model, label, task)] = write_eval(root, model_ref, task, rows, kind=kind,
                                                              finished_at=t0 + 100 + len(info.evals))
    if with_noise:
        model, task = models[0], tasks[0]
        sft = info.refs[model]["SFT-16bit"]
        kind = TASKS.get(task, "classification")
        make = classification_rows if kind == "classification" else generation_rows
        info.superseded.append(write_eval(root, sft, task, make(task, 0.2, n_examples, rng), kind=kind,
                                          lineage="0ld0ld0ld0ld0ld0", finished_at=t0 + 1))
        info.unfinished.append(write_eval(root, sft, task, make(task, 0.5, 4, rng), kind=kind,
                                          lineage="part1a1part1a1pa", partial=True))
        info.unfinished.append(write_eval(root, sft, task, make(task, 0.5, 4, rng), kind=kind,
                                          lineage="n0mark3rn0mark3r", completed=False))
        broken = write_eval(root, sft, task, make(task, 0.5, 4, rng), kind=kind, lineage="br0kenbr0kenbr0k")
        (broken / "metrics.json").write_text("{not json")
        info.malformed.append(broken)
    return info
