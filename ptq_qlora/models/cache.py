"""Model folders built in code (tiny-random, the SmolLM2 conversion), cached on disk so every
later load is a plain `from_pretrained(folder)`.

A folder is built in `<root>/.partial-<name>/` and renamed into place only when complete, so an
interrupted build is never read: the next build deletes the leftover and starts over. A file lock
keeps two processes (a multirun, parallel tests) from building the same folder at once."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

log = logging.getLogger(__name__)

CACHE_ENV = "PTQ_QLORA_CACHE"


def cache_root() -> Path:
    """`$PTQ_QLORA_CACHE`, else `$XDG_CACHE_HOME/ptq_qlora`, else `~/.cache/ptq_qlora`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ptq_qlora"


def partial_dir(name: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f".partial-{name}"


def build_once(name: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """`<root>/<name>`, calling `build(folder)` to fill it the first time it is asked for."""
    root = root or cache_root()
    final = root / name
    if final.is_dir():  # only a finished build is ever renamed to this name
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".lock-{name}")):
        if final.is_dir():  # another process finished it while we waited for the lock
            return final
        partial = partial_dir(name, root)
        if partial.exists():
            log.warning("discarding an interrupted build of %s in %s", name, partial)
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        build(partial)
        os.replace(partial, final)  # atomic on one filesystem
    return final
