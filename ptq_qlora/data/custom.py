"""The custom task (`task=custom`): the user's own data, in the paper's internal-task setting.

Rows come from local files or a Hub dataset id (exactly one of them):

- `task.path`: one JSONL / JSON / CSV / TSV / Parquet file, shuffled with data.seed and carved
  into train/dev/test by `task.split_ratios` (8/1/1 by default, as the paper did for Bitext);
- `task.train_file` (+ `task.dev_file`, `task.test_file`): the user's own splits; a split not
  given is carved from train, keeping the `split_ratios` proportions;
- `task.hub_id` (+ `hub_revision`): a Hub dataset; its train / validation (or dev) / test splits,
  a missing one carved from train the same way.

`task.kind` picks the target: classification (`label_field` + a label set from `labels`,
`labels_file` or the Hub ClassLabel names; the prompt lists the labels in an order shuffled per
example, like the paper's tasks) or generation (`reference_field`, scored with ROUGE). The same
row checks as the paper's tasks apply: rows with an empty text/label/reference are skipped and
counted as malformed, labels outside the set are skipped and counted, never mapped. A field that
is not a column of the data at all fails at once, naming the field and the columns there are.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from ptq_qlora.data.config import SPLITS, TaskConfig
from ptq_qlora.data.sources import ROW_KEY, RawData, _read_jsonl
from ptq_qlora.data.tasks import TASKS, BuildContext, TaskSpec

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# Hub split names that stand for dev, first match wins
HUB_DEV_SPLITS = ("validation", "dev", "valid", "val")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


class MissingFieldError(ValueError):
    """A configured field (text/label/reference/id) is not a column of the data."""


def read_custom(task: TaskConfig) -> RawData:
    """The user's rows per split (train always; dev/test where the source has them)."""
    files = {s: getattr(task, f"{s}_file") for s in SPLITS if getattr(task, f"{s}_file")}
    given = [name for name, value in (("task.path", task.path), ("task.train_file/dev_file/test_file", files),
                                      ("task.hub_id", task.hub_id)) if value]
    if len(given) != 1:
        raise ValueError(
            f"task {task.name!r}: set exactly one data source: task.path (one file, carved into train/dev/test), "
            f"task.train_file (+ task.dev_file, task.test_file) or task.hub_id; "
            f"{'got ' + ' and '.join(given) if given else 'none is set'}")
    if files and "train" not in files:
        raise ValueError(f"task {task.name!r}: task.dev_file/task.test_file need task.train_file as well")
    if task.hub_id:
        raw, where = _read_hub(task)
    else:
        files = files or {"train": task.path}
        splits, malformed, where = {}, {}, {}
        for split, path in files.items():
            file = _existing(path, split)
            splits[split], malformed[split] = read_table(file)
            where[split] = str(file)
            if not splits[split]:
                raise ValueError(f"task {task.name!r}: {file} has no readable rows ({malformed[split]} malformed)")
        raw = RawData(splits, "local", {}, malformed)
        log.info("task %s: read %s", task.name, {s: f"{len(r)} rows from {where[s]}" for s, r in splits.items()})
    _check_columns(task, raw, where)
    if task.kind == "classification" and task.label_field not in raw.class_labels:
        _labels_as_text(raw, task.label_field)
    return raw


def _existing(path: str, split: str) -> Path:
    file = Path(path).expanduser()
    what = "task.path" if split == "train" else f"task.{split}_file"
    if not file.is_file():
        raise FileNotFoundError(f"{split} data file not found: {file.resolve()} ({what}; "
                                f"relative paths start from the directory train.py is run in)")
    if file.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return file


def read_table(file: Path) -> tuple[list[dict], int]:
    """Rows (dicts, each with `_row` = its index in the file) and the number of unreadable ones."""
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(file)
    if suffix == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:
            return _read_jsonl(file)  # JSON lines under a .json name
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise ValueError(f"{file}: expected a JSON list of objects or JSON lines")
        rows = [{**row, ROW_KEY: i} for i, row in enumerate(data) if isinstance(row, dict)]
        return rows, len(data) - len(rows)
    if suffix in (".csv", ".tsv"):
        rows, bad = [], 0
        with file.open(encoding="utf-8-sig", newline="") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")):
                if None in row:  # more cells than header columns
                    bad += 1
                    log.warning("%s data row %d skipped: more cells than columns", file, i + 1)
                    continue
                rows.append({**row, ROW_KEY: i})
        return rows, bad
    import pandas as pd

    records = pd.read_parquet(file).to_dict("records")
    return [{**row, ROW_KEY: i} for i, row in enumerate(records)], 0


def _read_hub(task: TaskConfig) -> tuple[RawData, dict]:
    import datasets

    log.info("loading %s from the Hub (revision %s)", task.hub_id, task.hub_revision or "default")
    loaded = datasets.load_dataset(task.hub_id, revision=task.hub_revision)
    names = {"train": "train", "test": "test" if "test" in loaded else None,
             "dev": next((n for n in HUB_DEV_SPLITS if n in loaded), None)}
    if "train" not in loaded:
        raise KeyError(f"task {task.name!r}: {task.hub_id} has no 'train' split; it has {sorted(loaded)}")
    splits, class_labels, where = {}, {}, {}
    for split, name in names.items():
        if name is None:
            continue
        ds = loaded[name]
        for column, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                class_labels[column] = list(feature.names)
        splits[split] = [{**row, ROW_KEY: i} for i, row in enumerate(ds.to_list())]
        where[split] = f"{task.hub_id} split {name!r}"
    return RawData(splits, "hub", class_labels, {s: 0 for s in splits}), where


def _check_columns(task: TaskConfig, raw: RawData, where: dict) -> None:
    target = ("label_field", task.label_field) if task.kind == "classification" else ("reference_field", task.reference_field)
    fields = [("text_field", task.text_field), target] + ([("id_field", task.id_field)] if task.id_field else [])
    for split, rows in raw.splits.items():
        columns = list(dict.fromkeys(k for row in rows for k in row if k != ROW_KEY))
        for key, name in fields:
            if name not in columns:
                raise MissingFieldError(
                    f"task {task.name!r}: field {name!r} (task.{key}) is not a column of {where[split]}; "
                    f"its columns: {', '.join(map(str, columns)) or '(none)'}")


def _labels_as_text(raw: RawData, field: str) -> None:
    """Without ClassLabel names, a label is its text: a JSON 3 is the label "3", not label index 3."""
    for rows in raw.splits.values():
        for row in rows:
            value = row.get(field)
            if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and value != value):
                row[field] = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _carve(n: int, ratios: dict, missing: list[str], task: str) -> dict[str, int]:
    """How many rows of train each missing split takes, keeping the ratios among the pieces."""
    total = ratios["train"] + sum(ratios[s] for s in missing)
    counts = {s: max(1, round(n * ratios[s] / total)) for s in missing}
    if n - sum(counts.values()) < 1:
        raise ValueError(f"task {task!r}: {n} usable rows are too few to carve {', '.join(missing)} from train")
    return counts


def _custom_pools(ctx: BuildContext) -> dict[str, list[dict]]:
    pools = {s: ctx.shuffled(ctx.examples(s), s) for s in SPLITS if s in ctx.raw.splits}
    missing = [s for s in SPLITS if s not in pools]
    if missing:
        ratios = dict(zip(SPLITS, [float(r) for r in (ctx.task.split_ratios or DEFAULT_RATIOS)]))
        counts = _carve(len(pools["train"]), ratios, missing, ctx.task.name)
        train, start = pools["train"], 0
        for split in missing:  # dev before test, both from the front of the shuffled train rows
            pools[split] = train[start:start + counts[split]]
            start += counts[split]
        pools["train"] = train[start:]
    return pools


def custom_spec() -> TaskSpec:
    return TaskSpec(("train", "dev", "test"), _custom_pools, read=read_custom)


TASKS.register("custom")(custom_spec())

__all__ = ["MissingFieldError", "read_custom", "read_table"]
