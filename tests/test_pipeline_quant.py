"""SFT -> PTQ -> QLoRA on tiny-random for both quantizers, stages run alone, and the bad inputs
that must fail before any long work."""
import json
from pathlib import Path

import pytest

from conftest import TINY
from ptq_qlora.runstore import UnfinishedStageError
from ptq_qlora.stages.runner import run_job

LABELS = {"bnb-nf4": "PTQ-BNB-4bit", "gptq-4bit": "PTQ-GPTQ-4bit"}


def stage_metrics(store: Path, kind: str, lineage: str) -> dict:
    return json.loads((store / f"{kind}-{lineage}" / "metrics.json").read_text())


def test_pipeline_for_both_quantizers_reuses_sft(compose_cfg):
    store = Path(compose_cfg().paths.store)
    sft_lineages = set()
    for quantizer, label in LABELS.items():
        summary = run_job(compose_cfg(*TINY, "task=bitext", "stage=pipeline", f"quantizer={quantizer}"))
        assert list(summary["results"]) == ["SFT-16bit", label, f"{label}+QLoRA"]
        for metrics in summary["results"].values():
            assert metrics["n_examples"] == 12 and 0 <= metrics["f1_micro"] <= 1
        stages = summary["stages"]
        sft_lineages.add(stages["sft"]["lineage"])
        ptq = stage_metrics(store, "ptq", stages["ptq"]["lineage"])
        assert ptq["disk_bytes_after"] < ptq["disk_bytes_before"] and ptq["quantize_seconds"] > 0
        qlora = stage_metrics(store, "qlora", stages["qlora"]["lineage"])
        assert qlora["last_logged_loss"] < qlora["first_logged_loss"], qlora["loss_curve"]
        assert 0 < qlora["trainable_params"] < qlora["total_params"]
        adapter = store / f"qlora-{stages['qlora']['lineage']}" / "adapter"
        assert (adapter / "adapter_config.json").exists()
        assert not list(adapter.glob("model*.safetensors"))  # the adapter only, not the base
    assert len(sft_lineages) == 1 and len(list(store.glob("sft-*"))) == 1  # SFT trained once
    # the GPU profiles' GPTQ path (hardware.gptq_dequant_matmul) through the stage, on CPU here
    gptq_ptq = store / f"ptq-{stages['ptq']['lineage']}"  # the last loop's (gptq) PTQ run
    other = run_job(compose_cfg(*TINY, "task=bitext", "stage=qlora", "quantizer=gptq-4bit", f"stage.input={gptq_ptq}",
                                "hardware.dequantize_frozen_base=false", "hardware.gptq_dequant_matmul=true"))
    assert other["stages"]["qlora"]["lineage"] != stages["qlora"]["lineage"]
    qlora = stage_metrics(store, "qlora", other["stages"]["qlora"]["lineage"])
    assert qlora["last_logged_loss"] < qlora["first_logged_loss"], qlora["loss_curve"]


def test_stages_run_alone_from_run_folders(compose_cfg):
    store = Path(compose_cfg().paths.store)
    sft = run_job(compose_cfg(*TINY, "task=bitext", "stage=sft", "stage.eval_points=[]"))
    sft_dir = store / f"sft-{sft['stages']['sft']['lineage']}"
    ptq = run_job(compose_cfg(*TINY, "task=bitext", "stage=ptq", "quantizer=bnb-nf4", f"stage.input={sft_dir}"))
    assert list(ptq["results"]) == ["PTQ-BNB-4bit"]
    ptq_dir = store / f"ptq-{ptq['stages']['ptq']['lineage']}"
    qlora = run_job(compose_cfg(*TINY, "task=bitext", "stage=qlora", "quantizer=bnb-nf4", f"stage.input={ptq_dir}",
                                "hardware.fused_lora=true"))  # the GPU profiles' LoRA layers, on CPU here
    assert list(qlora["results"]) == ["PTQ-BNB-4bit+QLoRA"]
    qlora_dir = store / f"qlora-{qlora['stages']['qlora']['lineage']}"
    again = run_job(compose_cfg(*TINY, "task=bitext", f"stage.input={qlora_dir}", config_name="eval"))
    assert again["results"]["PTQ-BNB-4bit+QLoRA"]["f1_micro"] == qlora["results"]["PTQ-BNB-4bit+QLoRA"]["f1_micro"]


def test_qlora_on_unquantized_model_fails_before_training(compose_cfg):
    with pytest.raises(ValueError, match="QLoRA needs a 4-bit model"):
        run_job(compose_cfg(*TINY, "task=bitext", "stage=qlora", "quantizer=none"))


def test_ptq_refuses_unfinished_sft_folder(compose_cfg, tmp_path):
    unfinished = tmp_path / "runs" / ".partial-sft-0123"
    (unfinished / "model").mkdir(parents=True)
    with pytest.raises(UnfinishedStageError):
        run_job(compose_cfg(*TINY, "stage=ptq", "quantizer=bnb-nf4", f"stage.input={unfinished}"))
    with pytest.raises(FileNotFoundError):
        run_job(compose_cfg(*TINY, "stage=ptq", "quantizer=bnb-nf4", f"stage.input={tmp_path / 'no-such-run'}"))


@pytest.mark.parametrize("override, message", [
    ("quantizer.group_size=48", "48"),  # divides neither 64 nor 128
    ("quantizer.min_calibration_samples=1000", "calibration"),
])
def test_bad_gptq_settings_fail_before_sft(compose_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        run_job(compose_cfg(*TINY, "task=bitext", "stage=pipeline", "quantizer=gptq-4bit", override))
    assert not list(Path(compose_cfg().paths.store).glob("*sft-*"))  # no training started
