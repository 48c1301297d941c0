"""Config plumbing: structured-config schemas and the resolvers the YAML files use."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from ptq_qlora.config.schema import register_schemas

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def project_root() -> str:
    """The checkout holding conf/ (env PTQ_QLORA_ROOT overrides, e.g. for a packaged install)."""
    return os.environ.get("PTQ_QLORA_ROOT") or str(CONF_DIR.parent)


def setup() -> None:
    """Idempotent: register schemas and resolvers before Hydra composes anything."""
    if not OmegaConf.has_resolver("ptq_root"):
        OmegaConf.register_new_resolver("ptq_root", project_root)
    register_schemas()
