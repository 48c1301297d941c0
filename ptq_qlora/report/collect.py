"""Collect evaluation results into flat rows: from a run store's completed `eval-<lineage>/`
folders, or (optionally) from W&B runs' `eval/<point>/*` summary keys.

One `EvalRow` is one evaluated (model, point, task). The model *name* is not in an eval folder's
`stage.json` (it holds the evaluated model's ref: point, label, lineage, quantizer); it is found by
walking the ref's lineage up the store (qlora -> ptq -> sft, whose `stage.json` holds the job config
with `model.name`), or for the base model through the SFT stage that started from it. A future
`model_name` / `config.model.name` in the eval meta or metrics is used first when present.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ptq_qlora.point_labels import parse as parse_label
from ptq_qlora.point_labels import ptq_label, qlora_label
from ptq_qlora.runstore import COMPLETED, META

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# task -> kind, for folders whose metrics do not reveal it
TASK_KINDS = {"bitext": "classification", "banking77": "classification", "dialogsum": "generation"}
# scalar fields of metrics.json that are bookkeeping, not metrics
_NOT_METRICS = {"seed", "eval_seconds", "examples_per_second"}
_BITS_IN_LABEL = re.compile(r"-(\d+)bit")


class ReportError(RuntimeError):
    """A report cannot be made (missing store, nothing to report); the message says why/where."""


@dataclass
class EvalRow:
    model: str  # model config name (smollm2-135m, qwen2-7b, ...) or "unknown"
    label: str  # the paper's row name: SFT-16bit, PTQ-BNB-4bit, PTQ-BNB-4bit+QLoRA, base, ...
    task: str
    kind: str  # classification | generation | unknown
    metrics: dict  # numeric summary metrics (precision, f1_micro, rougeL, alignscore, n, ...)
    point: str = "?"  # chain point: base | sft | ptq | qlora | input
    method: str | None = None  # quantizer method (bnb, gptq) for ptq/qlora points
    bits: int | None = None  # weight bit width: the quantizer's `bits`, 16 for unquantized points
    lineage: str = "?"  # the eval's lineage
    model_lineage: str = "?"  # the evaluated model's lineage
    chain: list[str] = field(default_factory=list)  # every lineage from the eval up to the base
    finished_at: float | None = None
    predictions: Path | None = None  # predictions.jsonl (per-example scores), if available
    source: str = ""  # the eval folder, or wandb:<run path>

    @property
    def n_examples(self) -> int | None:
        value = self.metrics.get("n_examples", self.metrics.get("n"))
        return int(value) if value is not None else None

    def matches_lineage(self, prefix: str) -> bool:
        return any(lin.startswith(prefix) for lin in self.chain)


@dataclass
class Collection:
    rows: list[EvalRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder or run, why): unfinished
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (folder or run, what is wrong)
    notes: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # what was searched

    def extend(self, other: "Collection") -> None:
        for name in ("rows", "skipped", "malformed", "notes", "where"):
            getattr(self, name).extend(getattr(other, name))


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_values(data: dict) -> dict:
    return {k: v for k, v in data.items() if _numeric(v) and k not in _NOT_METRICS}


def task_kind(task: str, metrics: dict) -> str:
    if "f1_micro" in metrics:
        return "classification"
    if "rougeL" in metrics:
        return "generation"
    return TASK_KINDS.get(task, UNKNOWN)


def row_bits(label: str, point: str | None, quantizer: dict | None) -> int | None:
    """Weight bit width of an evaluated model: its quantizer's `bits` (the PTQ stage records the
    config it ran), 16 for unquantized points, else what the label says."""
    quantizer = quantizer or {}
    if quantizer.get("method", "none") != "none" and quantizer.get("bits") is not None:
        return int(quantizer["bits"])
    if point in ("base", "sft", "input") or label == "SFT-16bit":
        return 16
    return parse_label(label).bits


def normalise_label(label: str, quantizer: dict | None) -> tuple[str, str | None]:
    """The ref's label, with the bit width corrected when the quantizer config disagrees with it
    (stores written before the labels followed `bits` say PTQ-GPTQ-4bit even with `bits=3`)."""
    bits = (quantizer or {}).get("bits")
    found = _BITS_IN_LABEL.search(label or "")
    if bits is not None and found and int(found.group(1)) != int(bits):
        fixed = _BITS_IN_LABEL.sub(f"-{int(bits)}bit", label, count=1)
        return fixed, (f"label {label!r} says {found.group(1)} bits but its quantizer has bits={bits}: "
                       f"shown as {fixed!r}")
    return label, None


# ------------------------------------------------------------------------------------ run store
class _StoreIndex:
    """Reads (and caches) the store's stage metas to resolve model names through lineage."""

    def __init__(self, root: Path):
        self.root = root
        self._metas: dict[str, dict | None] = {}
        self._base_names: dict[str, str] | None = None
        self.model_notes: dict[str, str] = {}  # model name -> its config's caveat (model.notes)

    def meta(self, kind: str, lineage: str) -> dict | None:
        key = f"{kind}-{lineage}"
        if key not in self._metas:
            path = self.root / key / META
            try:
                self._metas[key] = json.loads(path.read_text()) if (self.root / key / COMPLETED).exists() else None
            except (OSError, ValueError):
                self._metas[key] = None
        return self._metas[key]

    def base_names(self) -> dict[str, str]:
        """base lineage -> model name, from every completed SFT stage's parent ref and config."""
        if self._base_names is None:
            self._base_names = {}
            for folder in sorted(self.root.glob("sft-*")):
                meta = self.meta("sft", folder.name[len("sft-"):])
                name = _config_model_name(meta or {})
                parent = (meta or {}).get("parent") or {}
                if name and parent.get("lineage"):
                    self._base_names.setdefault(parent["lineage"], name)
        return self._base_names

    def resolve(self, ref: dict) -> tuple[str, list[str]]:
        """(model name or "unknown", lineages from the ref up its chain)."""
        chain, name = [], None
        current = ref
        for _ in range(8):  # qlora -> ptq -> sft -> base, with room for longer chains
            point, lineage = current.get("point"), current.get("lineage")
            if not lineage:
                break
            chain.append(lineage)
            if point in ("base", "input"):
                name = name or self.base_names().get(lineage)
                break
            meta = self.meta(point, lineage)
            if meta is None:
                break
            if not name and _config_model_name(meta):
                name = _config_model_name(meta)
                caveat = ((meta.get("config") or {}).get("model") or {}).get("notes")
                if caveat:
                    self.model_notes.setdefault(name, str(caveat))
            current = meta.get("parent") or {}
        return name or UNKNOWN, chain


def _config_model_name(meta: dict) -> str | None:
    if meta.get("model_name"):
        return str(meta["model_name"])
    model = (meta.get("config") or {}).get("model")
    return str(model["name"]) if isinstance(model, dict) and model.get("name") else None


def collect_store(store: str | Path) -> Collection:
    """Every completed `eval-*` folder of `store` as rows; unfinished (`.partial-eval-*`, no
    `completed` marker) and malformed folders are counted and logged, never read."""
    root = Path(store)
    if not root.is_dir():
        raise ReportError(f"run store not found: {root.resolve()} (pass --store, or set PTQ_QLORA_STORE)")
    result = Collection(where=[f"{root.resolve()}/eval-*/"])
    index = _StoreIndex(root)
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith(".partial-eval-"):
            result.skipped.append((str(folder), "unfinished (.partial folder)"))
            continue
        if not folder.name.startswith("eval-"):
            continue
        if not (folder / COMPLETED).exists():
            result.skipped.append((str(folder), f"no '{COMPLETED}' marker"))
            continue
        try:
            result.rows.append(_read_eval_folder(folder, index, result.notes))
        except (OSError, ValueError, KeyError, TypeError) as err:
            result.malformed.append((str(folder), f"{type(err).__name__}: {err}"))
    for model in sorted({r.model for r in result.rows} & set(index.model_notes)):
        result.notes.append(f"{model}: {index.model_notes[model]}")
    if result.skipped:
        log.info("skipped %d unfinished eval folder(s): %s", len(result.skipped),
                 ", ".join(Path(p).name for p, _ in result.skipped))
    for path, why in result.malformed:
        log.warning("malformed eval folder %s: %s", path, why)
    return result


def _read_eval_folder(folder: Path, index: _StoreIndex, notes: list[str]) -> EvalRow:
    meta = json.loads((folder / META).read_text()) if (folder / META).exists() else {}
    metrics_path = folder / "metrics.json"
    if not metrics_path.exists():
        raise ValueError("no metrics.json")
    data = json.loads(metrics_path.read_text())
    if not isinstance(data, dict):
        raise ValueError("metrics.json is not an object")
    ref = meta.get("model") or data.get("model")
    if not isinstance(ref, dict) or not ref.get("label"):
        raise ValueError("no model ref (stage.json 'model' / metrics.json 'model')")
    task = data.get("task") or ((meta.get("config") or {}).get("task") or {}).get("name")
    if not task:
        raise ValueError("metrics.json has no 'task'")
    name, chain = index.resolve(ref)
    name = _config_model_name(meta) or data.get("model_name") or name
    label, note = normalise_label(ref["label"], ref.get("quantizer"))
    if note:
        notes.append(f"{folder.name}: {note}")
    metrics = metric_values(data)
    lineage = meta.get("lineage") or folder.name[len("eval-"):]
    predictions = folder / "predictions.jsonl"
    return EvalRow(
        model=name, label=label, task=str(task), kind=task_kind(str(task), metrics), metrics=metrics,
        point=ref.get("point", "?"), method=(ref.get("quantizer") or {}).get("method"),
        bits=row_bits(label, ref.get("point"), ref.get("quantizer")),
        lineage=lineage, model_lineage=ref.get("lineage", "?"), chain=[lineage, *chain],
        finished_at=meta.get("finished_at"), predictions=predictions if predictions.exists() else None,
        source=str(folder),
    )


# ------------------------------------------------------------------------------------ W&B
def _lookup(config: dict, dotted: str):
    """`config["a.b"]` (flattened) or `config["a"]["b"]` (nested), unwrapping {"value": ...}."""
    if dotted in config:
        value = config[dotted]
    else:
        value = config
        for part in dotted.split("."):
            if isinstance(value, dict) and set(value) == {"value"}:
                value = value["value"]
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    return value["value"] if isinstance(value, dict) and set(value) == {"value"} else value


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    for attr in ("_json_dict",):
        if isinstance(getattr(obj, attr, None), dict):
            return getattr(obj, attr)
    return {k: obj[k] for k in obj.keys()}


def collect_wandb(project: str, filters: dict | None = None, api=None,
                  points: Iterable[str] | None = None) -> Collection:
    """Rows from the W&B runs of `project` ("entity/project" or "project"): one per
    `eval/<point>/...` group in a finished run's summary. Model and task names come from the run
    config; the label from the local eval folder named in `config.stages` when it exists here,
    else from the point and `quantizer.label`. `api` defaults to `wandb.Api()` (needs network)."""
    if api is None:
        try:
            import wandb

            api = wandb.Api()
        except Exception as err:  # no key, no network, ...
            raise ReportError(f"cannot reach W&B for project {project!r}: {err}") from err
    result = Collection(where=[f"wandb:{project}"])
    try:
        runs = list(api.runs(project, filters=filters or {}))
    except Exception as err:
        raise ReportError(f"W&B query of project {project!r} failed: {err}") from err
    for run in runs:
        name = "/".join(str(p) for p in getattr(run, "path", [getattr(run, "id", "?")]))
        if getattr(run, "state", "finished") != "finished":
            result.skipped.append((f"wandb:{name}", f"run state {run.state!r}"))
            continue
        try:
            result.rows.extend(_wandb_rows(run, name, points, result.notes))
        except (ValueError, KeyError, TypeError) as err:
            result.malformed.append((f"wandb:{name}", f"{type(err).__name__}: {err}"))
    return result


def _wandb_rows(run, name: str, points, notes: list[str]) -> list[EvalRow]:
    config, summary = _as_dict(run.config), _as_dict(run.summary)
    groups: dict[str, dict] = {}
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and _numeric(value) and parts[2] != "reused":
            groups.setdefault(parts[1], {})[parts[2]] = value
    task = _lookup(config, "task.name")
    if groups and not task:
        raise ValueError("run config has no task.name")
    model = _lookup(config, "model.name") or UNKNOWN
    qlabel, qbits = _lookup(config, "quantizer.label"), _lookup(config, "quantizer.bits")
    no_sft = bool(_lookup(config, "stage.skip_sft"))
    finished = summary.get("_timestamp")
    stages = _lookup(config, "stages") or {}
    rows = []
    for point, metrics in sorted(groups.items()):
        if points is not None and point not in points:
            continue
        stage = stages.get(f"eval-{point}") or {}
        folder = Path(str(stage.get("path", ""))) if stage.get("path") else None
        ref, lineage = None, str(stage.get("artifact", "?")).removeprefix("eval-")
        if folder is not None and (folder / META).exists():
            try:
                ref = json.loads((folder / META).read_text()).get("model")
            except (OSError, ValueError):
                ref = None
        if ref and ref.get("label"):
            label, note = normalise_label(ref["label"], ref.get("quantizer"))
        else:
            label, note = _wandb_label(point, qlabel, qbits, no_sft)
        if note:
            notes.append(f"wandb:{name} eval/{point}: {note}")
        if ref:
            method, bits = (ref.get("quantizer") or {}).get("method"), row_bits(label, point, ref.get("quantizer"))
        else:
            method = _lookup(config, "quantizer.method") if point in ("ptq", "qlora") else None
            bits = row_bits(label, point, {"method": method, "bits": qbits} if method else None)
        predictions = folder / "predictions.jsonl" if folder is not None else None
        rows.append(EvalRow(
            model=str(model), label=label, task=str(task), kind=task_kind(str(task), metrics), metrics=metrics,
            point=point, method=method, bits=bits,
            lineage=lineage, model_lineage=(ref or {}).get("lineage", "?"), chain=[lineage],
            finished_at=float(finished) if _numeric(finished) else None,
            predictions=predictions if predictions is not None and predictions.exists() else None,
            source=f"wandb:{name}",
        ))
    return rows


def _wandb_label(point: str, qlabel, qbits, no_sft: bool = False) -> tuple[str, str | None]:
    if point == "sft":
        return "SFT-16bit", None
    if point in ("ptq", "qlora"):
        if not qlabel or qlabel == "SFT-16bit":
            return f"{point}-unknown-quantizer", f"no quantizer label in the run config for point {point!r}"
        label, note = normalise_label(str(qlabel), {"bits": qbits} if qbits is not None else None)
        label = ptq_label(label, no_sft)
        return (qlora_label(label) if point == "qlora" else label), note
    return point, None


# ------------------------------------------------------------------------------------ selection
def filter_rows(rows: list[EvalRow], tasks=None, models=None, lineage: str | None = None) -> list[EvalRow]:
    return [
        r for r in rows
        if (not tasks or r.task in tasks) and (not models or r.model in models)
        and (not lineage or r.matches_lineage(lineage))
    ]


def keep_newest(rows: list[EvalRow]) -> tuple[list[EvalRow], list[str]]:
    """One row per (model, label, task): the newest by `finished_at`; a note names the dropped
    ones. The same eval lineage seen twice (store and W&B) counts once, the store's copy first."""
    by_lineage: dict[str, EvalRow] = {}
    unique = []
    for row in rows:
        if row.lineage != "?" and row.lineage in by_lineage:
            continue
        if row.lineage != "?":
            by_lineage[row.lineage] = row
        unique.append(row)
    groups: dict[tuple, list[EvalRow]] = {}
    for row in unique:
        groups.setdefault((row.model, row.label, row.task), []).append(row)
    kept, notes = [], []
    for key, group in groups.items():
        group.sort(key=lambda r: (r.finished_at if r.finished_at is not None else -math.inf, r.lineage))
        newest = group[-1]
        kept.append(newest)
        if len(group) > 1:
            dropped = ", ".join(f"eval-{r.lineage}" for r in group[:-1])
            notes.append(
                f"{key[0]} / {key[1]} / {key[2]}: {len(group)} evaluations; kept the newest, eval-{newest.lineage} "
                f"(model lineage {newest.model_lineage}); not shown: {dropped}. Choose another with --lineage PREFIX."
            )
    return kept, notes
