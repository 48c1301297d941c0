"""The run store: each stage's output lives in `<store>/<kind>-<lineage>/`, where the lineage is a
hash of every config that shaped it. A stage writes into `.partial-<kind>-<lineage>/`, drops a
`completed` marker with its metrics, then renames the folder into place, so a folder without the
marker is never read. A crashed stage keeps its partial folder (checkpoints included) and the next
run with the same lineage resumes there. A file lock keeps two jobs off the same lineage. On several
GPUs all ranks write into the one partial folder and rank 0 alone marks and renames it (`writing`)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

log = logging.getLogger(__name__)

COMPLETED = "completed"
META = "stage.json"


def lineage_of(parent: str | None, **parts: Any) -> str:
    """Stable short hash of the parent lineage and the (JSON-able) configs of this stage."""
    blob = json.dumps({"parent": parent, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    kind: str
    lineage: str
    path: Path
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    reused: bool = False


class UnfinishedStageError(RuntimeError):
    pass


class RunStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def final_dir(self, kind: str, lineage: str) -> Path:
        return self.root / f"{kind}-{lineage}"

    def partial_dir(self, kind: str, lineage: str) -> Path:
        return self.root / f".partial-{kind}-{lineage}"

    def find(self, kind: str, lineage: str) -> StageRecord | None:
        """The completed stage of this lineage, or None."""
        path = self.final_dir(kind, lineage)
        return read_record(path) if (path / COMPLETED).exists() else None

    @staticmethod
    def drop_checkpoints(folder: Path) -> None:
        """Trainer checkpoints are only for resuming; a finished stage keeps its final weights."""
        shutil.rmtree(Path(folder) / "checkpoints", ignore_errors=True)

    @contextmanager
    def writing(self, kind: str, lineage: str, meta: dict, force: bool = False) -> Iterator[Path]:
        """Yield the partial folder to write into; on success mark it completed and move it into
        place. The caller writes `metrics.json` itself (or passes metrics through `meta`).

        Several ranks (torchrun / accelerate launch): every rank gets the same partial folder (the
        lineage is the same everywhere) and writes its part into it; rank 0 alone takes the lock,
        prepares the folder, writes the marker and renames, and the other ranks wait at barriers
        before writing (the folder exists), after writing (all parts are there) and after the
        rename (the final folder is in place for everyone)."""
        from ptq_qlora import distributed

        main = distributed.is_main_process()
        final = self.final_dir(kind, lineage)
        partial = self.partial_dir(kind, lineage)
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f".lock-{kind}-{lineage}")) if main else nullcontext():
            # another job may have completed this lineage while we waited for the lock: its
            # folder may be in use, so without force it is kept and our copy is dropped
            done_meanwhile = main and not force and (final / COMPLETED).exists()
            if main:
                if force and final.exists():
                    log.info("force=true: redoing %s", final.name)
                    shutil.rmtree(final)
                if partial.exists():
                    log.info("resuming unfinished stage in %s", partial)
                partial.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            yield partial
            distributed.barrier()
            if done_meanwhile:
                log.warning("%s was completed by another job meanwhile; keeping that one", final.name)
                shutil.rmtree(partial)
            elif main:
                meta = {**meta, "kind": kind, "lineage": lineage, "finished_at": time.time()}
                (partial / META).write_text(json.dumps(meta, indent=2, default=str))
                (partial / COMPLETED).write_text("")
                if final.exists():  # a stale copy (force, or a race before the lock existed)
                    shutil.rmtree(final)
                os.replace(partial, final)
            distributed.barrier()
        if main:
            log.info("stage %s completed: %s", kind, final)


def read_record(path: str | os.PathLike) -> StageRecord:
    """Read a completed stage folder; an unfinished one is refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no stage folder at {path}")
    if not (path / COMPLETED).exists():
        raise UnfinishedStageError(
            f"{path} has no '{COMPLETED}' marker: the stage that wrote it did not finish; "
            "re-run it (it resumes) or point at a completed run"
        )
    meta = json.loads((path / META).read_text()) if (path / META).exists() else {}
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return StageRecord(meta.get("kind", "?"), meta.get("lineage", "?"), path, metrics, meta, reused=True)


def is_stage_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / META).exists() or (path / COMPLETED).exists() or path.name.startswith(".partial-")
