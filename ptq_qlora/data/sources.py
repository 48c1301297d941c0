"""Raw rows from the Hugging Face Hub or from the offline mirror, in one shape.

Both paths return `RawData`: per source split, a list of plain dicts (the dataset's own columns
plus `_row`, the row's index in its split, which ids are built from). Everything after this
module is the same for both paths.

Mirror layout (see ../shared/data/README.md): `<local_dir>/<mirror>/<split>.jsonl`, one JSON
object per line, same columns as the Hub; banking77's label names in `label_names.json`. The
mirror is read line by line rather than with `load_dataset("json")` so that one broken line is
skipped and counted instead of failing the whole split.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import datasets

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "local")
ROW_KEY = "_row"


@dataclass
class RawData:
    splits: dict[str, list[dict]]
    source: str  # "hub" | "local"
    # ClassLabel names per column, where the source declares them (label_names.json / Hub features).
    class_labels: dict[str, list[str]] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)  # unreadable lines per split


def resolve_source(source: str, local_dir: Optional[str], mirror: str) -> str:
    """`auto` means: the mirror when its folder exists, else the Hub."""
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
    if source != "auto":
        return source
    return "local" if local_dir and (Path(local_dir) / mirror).is_dir() else "hub"


def load_raw(
    *, source: str, local_dir: Optional[str], mirror: str, hub_id: str,
    hub_revision: Optional[str], splits: Sequence[str],
) -> RawData:
    resolved = resolve_source(source, local_dir, mirror)
    if resolved == "local":
        if not local_dir:
            raise ValueError("data.source=local needs data.local_dir (the folder holding the mirrors)")
        return read_mirror(Path(local_dir) / mirror, splits)
    return read_hub(hub_id, hub_revision, splits)


def read_mirror(folder: Path, splits: Sequence[str]) -> RawData:
    out, malformed = {}, {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"split file not found: {path} (set data.local_dir to the folder holding the "
                f"dataset mirrors, or data.source=hub to download from the Hugging Face Hub)"
            )
        out[split], malformed[split] = _read_jsonl(path)
    class_labels = {}
    names_file = folder / "label_names.json"
    if names_file.is_file():
        # Only banking77 ships one; it names the `label` column's ids, as the Hub ClassLabel does.
        class_labels["label"] = [str(n) for n in json.loads(names_file.read_text(encoding="utf-8"))]
    log.info("read mirror %s: %s", folder, {s: len(r) for s, r in out.items()})
    return RawData(out, "local", class_labels, malformed)


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row, reason = None, f"not JSON ({err.msg})"
            else:
                reason = "not a JSON object"
            if not isinstance(row, dict):
                bad += 1
                log.warning("%s line %d skipped: %s", path, index + 1, reason)
                continue
            row[ROW_KEY] = index
            rows.append(row)
    return rows, bad


def read_hub(hub_id: str, revision: Optional[str], splits: Sequence[str]) -> RawData:
    log.info("loading %s from the Hub (revision %s)", hub_id, revision or "default")
    loaded = datasets.load_dataset(hub_id, revision=revision)
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise KeyError(f"{hub_id} has no split(s) {missing}; it has {sorted(loaded)}")
    out, class_labels = {}, {}
    for split in splits:
        ds = loaded[split]
        for column, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                class_labels[column] = list(feature.names)
        out[split] = [{**row, ROW_KEY: i} for i, row in enumerate(ds.to_list())]
    return RawData(out, "hub", class_labels, {s: 0 for s in splits})


def read_labels_file(path: str) -> list[str]:
    """A label set from a file: a JSON list (`.json`) or one label per line (blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"labels file not found: {file.resolve()} (task.labels_file)")
    text = file.read_text(encoding="utf-8-sig")
    if file.suffix.lower() == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise ValueError(f"{file}: expected a JSON list of label names")
        return [str(n).strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]
