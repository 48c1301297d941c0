"""`load_task_data`: raw rows -> task pools -> paper sizes -> caps -> general mix -> length filter."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from datasets import Dataset, Features, Value

from ptq_qlora.data.config import KINDS, SPLITS, DataConfig, TaskConfig, as_schema
from ptq_qlora.data.filtering import SkipCounts, filter_by_length
from ptq_qlora.data.mix import GENERAL, general_counts, load_general_pool, mix_general
from ptq_qlora.data.prompts import check_template
from ptq_qlora.data.sources import load_raw
from ptq_qlora.data.tasks import TASKS, BuildContext

log = logging.getLogger(__name__)

COLUMNS = ("id", "prompt", "completion", "reference", "source")
FEATURES = Features({c: Value("string") for c in COLUMNS})


@dataclass
class TaskData:
    name: str
    kind: str  # classification | generation
    labels: Optional[list[str]]  # canonical label names (classification), else None
    train: Dataset
    dev: Dataset
    test: Dataset
    stats: dict = field(default_factory=dict)


def load_task_data(task_cfg, data_cfg, tokenizer=None) -> TaskData:
    """Build the task's train/dev/test splits (columns: id, prompt, completion, reference, source).

    `task_cfg`/`data_cfg`: TaskConfig/DataConfig, or the Hydra nodes `cfg.task`/`cfg.data`.
    `tokenizer`: a Hugging Face tokenizer; when given, rows longer than
    `data.max_input_tokens` (prompt) or `data.max_output_tokens` (completion) are dropped.
    """
    task, data = as_schema(task_cfg, TaskConfig), as_schema(data_cfg, DataConfig)
    spec = TASKS.get(task.builder or task.name)
    _check_task(task)
    if spec.read is not None:
        raw = spec.read(task)
    else:
        if not task.hub_id or not task.mirror:
            raise ValueError(f"task {task.name!r}: needs hub_id and mirror (the Hub id and the mirror folder name)")
        raw = load_raw(source=data.source, local_dir=data.local_dir, mirror=task.mirror,
                       hub_id=task.hub_id, hub_revision=task.hub_revision, splits=spec.source_splits)
    skips = SkipCounts()
    skips.malformed.update({s: n for s, n in raw.malformed.items() if n})
    ctx = BuildContext(task, raw, data.seed, skips)
    pools = spec.make_pools(ctx)
    caps = {"train": data.max_train, "dev": data.max_dev, "test": data.max_test}
    requested = {s: _requested(task.split_sizes[s], caps[s]) for s in SPLITS}
    # a cap above a task's own size (split_sizes null: every row) is only a limit, no shortfall
    splits = {s: _take(pools[s], requested[s], s, task.name, warn=task.split_sizes[s] is not None) for s in SPLITS}

    general_source = None
    wanted = general_counts(data, {s: len(rows) for s, rows in splits.items()})
    if wanted["train"] or wanted["dev"]:
        pool, general_source = load_general_pool(data, skips)
        splits = mix_general(splits, pool, wanted, data.seed)

    dropped = {s: 0 for s in SPLITS}
    if tokenizer is not None:
        for s in SPLITS:
            splits[s], dropped[s] = filter_by_length(splits[s], tokenizer, data.max_input_tokens,
                                                     data.max_output_tokens, s)
    _check_result(splits, requested, task.name, skips, dropped)
    stats = {
        "source": raw.source,
        "general_source": general_source,
        "rows": {s: len(rows) for s, rows in splits.items()},
        "task_rows": {s: sum(r["source"] == "task" for r in rows) for s, rows in splits.items()},
        "general_rows": {s: sum(r["source"] == GENERAL for r in rows) for s, rows in splits.items()},
        "requested_task_rows": requested,
        "dropped_by_length": dropped,
        "malformed_skipped": dict(skips.malformed),
        "unknown_label_skipped": dict(skips.unknown_label),
        "seed": data.seed,
    }
    log.info("task %s (%s): %s", task.name, raw.source, stats)
    datasets_ = {s: Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=FEATURES)
                 for s, rows in splits.items()}
    return TaskData(task.name, task.kind, ctx.labels, datasets_["train"], datasets_["dev"], datasets_["test"], stats)


def _check_task(task: TaskConfig) -> None:
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r}: kind={task.kind!r}; expected one of {', '.join(KINDS)}")
    check_template(task.prompt_template, task.kind, task.name)
    field_needed = "label_field" if task.kind == "classification" else "reference_field"
    if not getattr(task, field_needed):
        raise ValueError(f"task {task.name!r}: a {task.kind} task needs {field_needed}")
    missing = [s for s in SPLITS if s not in task.split_sizes]
    if missing:
        raise ValueError(f"task {task.name!r}: split_sizes lacks {missing} (needs train, dev, test)")


def _requested(paper_size, cap) -> Optional[int]:
    """Rows to take; None = the whole pool (a task whose split_sizes are null, e.g. custom)."""
    sizes = [int(n) for n in (paper_size, cap) if n is not None]
    return min(sizes) if sizes else None


def _take(pool: list[dict], n: Optional[int], split: str, task: str, warn: bool = True) -> list[dict]:
    if n is None:
        return pool
    if len(pool) < n and warn:
        log.warning("task %s: %s has %d usable rows, fewer than the %d requested; using all of them",
                    task, split, len(pool), n)
    return pool[:n]


def _check_result(splits: dict, requested: dict, task: str, skips: SkipCounts, dropped: dict) -> None:
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        if ids[a] & ids[b]:  # guards the builders; a shared row would inflate test scores
            raise RuntimeError(f"task {task}: {len(ids[a] & ids[b])} rows are in both {a} and {b}")
    for s, rows in splits.items():
        if (requested[s] is None or requested[s] > 0) and not any(r["source"] == "task" for r in rows):
            raise ValueError(
                f"task {task}: the {s} split is empty after skipping rows (malformed: "
                f"{dict(skips.malformed)}, unknown label: {dict(skips.unknown_label)}, too long: {dropped[s]})")
