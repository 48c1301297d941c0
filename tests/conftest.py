"""Shared test setup: offline, small CPU budgets, configs composed from the real conf/ tree."""
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel needs it on small CPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from ptq_qlora.config import CONF_DIR, setup  # noqa: E402

setup()

# A tiny-random job: seconds per stage on CPU.
TINY = [
    "model=tiny-random",
    "data=cpu",
    "data.max_train=48",
    "data.max_dev=8",
    "data.max_test=12",
    "data.general_mix_ratio=0.25",
    "hardware.train_batch_size=8",
    "hardware.eval_batch_size=12",
    "sft.lr=3e-3",
    "sft.epochs=4",
    "sft.warmup=0",
    "sft.logging_steps=1",
    "qlora.lr=3e-3",
    "qlora.epochs=2",
    "qlora.logging_steps=1",
    "eval.max_new_tokens=8",
]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose conf/ with overrides; outputs and the run store go under tmp_path."""

    def make(*overrides, config_name="config"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.store = str(tmp_path / "runs")
        return cfg

    return make
