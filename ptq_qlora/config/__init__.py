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
    if not OmegaConf.has_resolver("run_stamp"):
        # like Hydra's ${now:FMT}, but one value for all ranks of a multi-GPU launch (env
        # PTQ_QLORA_RUN_ID, else rank 0's clock through the launcher's store): ptq_qlora.distributed
        from ptq_qlora.distributed import run_stamp

        OmegaConf.register_new_resolver("run_stamp", run_stamp)
    register_schemas()
