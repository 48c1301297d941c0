"""What every stage of one job shares: the config, the run store, the task data, the tracker."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ptq_qlora.data import TaskData
from ptq_qlora.runstore import RunStore

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    cfg: Any
    store: RunStore
    data: TaskData
    tracker: Optional[Any] = None  # experiment logger (None: logging off)
    results: dict = field(default_factory=dict)

    def log_metrics(self, metrics: dict, prefix: str, reused: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, prefix=prefix, reused=reused)

    def log_predictions(self, point: str, rows, reused: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.log_predictions(point, rows, reused=reused)

    def log_stage_artifact(self, kind: str, lineage: str, path, parents=(), reused: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.log_stage_artifact(kind, lineage, path, parents=parents, reused=reused)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: float32, bfloat16, float16") from None


def reuse_completed(ctx: "JobContext", kind: str, lineage: str, parent, metrics_prefix: str):
    """The ModelRef of a completed stage of this lineage (logged as reused), or None when it must
    run (none stored, or force=true)."""
    from ptq_qlora.stages.refs import ref_from_stage_folder

    found = None if ctx.cfg.force else ctx.store.find(kind, lineage)
    if not found:
        return None
    log.info("%s reused from %s", kind.upper(), found.path)
    ctx.log_metrics(found.metrics, prefix=metrics_prefix, reused=True)
    ctx.log_stage_artifact(kind, lineage, found.path, parents=[parent], reused=True)
    return ref_from_stage_folder(found)
