"""Hydra multirun through the real CLI (`python train.py -m ...` in a subprocess): a QLoRA LR sweep
trains SFT and quantizes once, then runs one QLoRA per LR; and the SLURM launcher config composes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TINY
from ptq_qlora.config import CONF_DIR

REPO = CONF_DIR.parent
LRS = (1e-3, 2e-3)

# TINY, shrunk further so that two jobs fit well under a minute on 2 CPU cores: 16 Bitext rows (two
# steps of 8 per epoch), no general rows, one epoch per stage, 4 test rows.
SHRINK = {
    "data.max_train": "16", "data.max_dev": "2", "data.max_test": "4", "data.general_mix_ratio": "0",
    "hardware.eval_batch_size": "4", "sft.epochs": "1", "qlora.epochs": "1",
}


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def sweep_overrides(store: Path, sweep_dir: Path) -> list[str]:
    tiny = [o for o in TINY if _key(o) not in SHRINK and _key(o) != "qlora.lr"]
    return [
        *tiny, *(f"{k}={v}" for k, v in SHRINK.items()),
        "task=bitext", "stage=qlora", "quantizer=bnb-nf4", "qlora.lr=" + ",".join(str(lr) for lr in LRS),
        f"paths.store={store}", f"hydra.sweep.dir={sweep_dir}",
    ]


def test_qlora_lr_sweep_trains_sft_and_quantizes_once(tmp_path):
    store, sweep_dir = tmp_path / "runs", tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    env.pop("PTQ_QLORA_STORE", None)
    proc = subprocess.run([sys.executable, "train.py", "-m", *sweep_overrides(store, sweep_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # both jobs ran, each in its own folder of the sweep, with its own LR
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    summaries = [json.loads((job / "results.json").read_text()) for job in jobs]
    for job, summary, lr in zip(jobs, summaries, LRS):
        assert f"qlora.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert list(summary["results"]) == ["PTQ-BNB-4bit+QLoRA"]
        assert summary["results"]["PTQ-BNB-4bit+QLoRA"]["n_examples"] == 4

    # one SFT and one PTQ folder (the second job reused them), one QLoRA folder per LR
    assert len(list(store.glob("sft-*"))) == 1 and len(list(store.glob("ptq-*"))) == 1
    qlora = sorted(store.glob("qlora-*"))
    assert len(qlora) == 2 and not list(store.glob(".partial-*"))
    assert sorted(json.loads((q / "stage.json").read_text())["train"]["lr"] for q in qlora) == list(LRS)
    first, second = (s["stages"] for s in summaries)
    assert first["sft"]["lineage"] == second["sft"]["lineage"] and first["ptq"]["lineage"] == second["ptq"]["lineage"]
    assert first["qlora"]["lineage"] != second["qlora"]["lineage"]
    second_log = (jobs[1] / "train.log").read_text()
    assert "SFT reused" in second_log and "PTQ reused" in second_log


def slurm_launcher(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_composes_with_cluster_settings_from_the_environment(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    for name in ("PARTITION", "ACCOUNT", "QOS", "GPUS", "CPUS", "MEM_GB", "TIMEOUT_MIN"):
        monkeypatch.delenv(f"PTQ_QLORA_SLURM_{name}", raising=False)
    launcher = slurm_launcher("experiment=paper/qwen2-7b_bnb_ext")
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.qos) == (None, None, None)  # the cluster's defaults
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout == 2
    assert launcher.name == "ptq-qwen2-7b_bnb_ext"

    monkeypatch.setenv("PTQ_QLORA_SLURM_PARTITION", "a100")
    monkeypatch.setenv("PTQ_QLORA_SLURM_GPUS", "2")
    monkeypatch.setenv("PTQ_QLORA_SLURM_TIMEOUT_MIN", "240")
    launcher = slurm_launcher("hydra.launcher.mem_gb=64")
    plain = OmegaConf.to_container(launcher, resolve=True)
    assert (plain["partition"], plain["gpus_per_node"], plain["timeout_min"], plain["mem_gb"]) == ("a100", 2, 240, 64)


def test_slurm_launcher_misspelt_key_fails():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with pytest.raises(Exception, match="timeout_mins"):
        slurm_launcher("hydra.launcher.timeout_mins=5")
