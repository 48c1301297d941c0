"""Experiment tracking. `logger=none` gives no tracker; W&B comes with the tracking issue."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def tracker_for(cfg):
    if cfg.logger.name == "none":
        yield None
        return
    raise ValueError(f"unknown logger {cfg.logger.name!r}; known: none")
