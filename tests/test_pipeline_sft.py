"""End to end on tiny-random: SFT then evaluation, run-store reuse, resume after a crash."""
import json
from pathlib import Path

import pytest

from conftest import TINY
from ptq_qlora.runstore import UnfinishedStageError
from ptq_qlora.stages.runner import run_job


def test_sft_then_eval_on_tiny_random(compose_cfg):
    cfg = compose_cfg(*TINY, "task=bitext")
    summary = run_job(cfg)
    sft = summary["stages"]["sft"]
    record = json.loads((Path(cfg.paths.store) / f"sft-{sft['lineage']}" / "metrics.json").read_text())
    assert record["last_logged_loss"] < record["first_logged_loss"] * 0.8, record["loss_curve"]
    assert set(summary["results"]) == {"base", "SFT-16bit"}
    for metrics in summary["results"].values():
        assert metrics["n_examples"] == 12
        assert 0.0 <= metrics["f1_micro"] <= 1.0
    eval_dirs = list(Path(cfg.paths.store).glob("eval-*"))
    assert len(eval_dirs) == 2
    rows = [json.loads(line) for line in (eval_dirs[0] / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"id", "prediction", "reference", "correct"} <= set(rows[0])
    assert (Path(cfg.paths.output_dir) / "results.md").read_text().count("|") > 10

    # same config again: every stage is reused, nothing retrained
    again = run_job(compose_cfg(*TINY, "task=bitext"))
    assert again["stages"]["sft"]["lineage"] == sft["lineage"]
    assert again["results"]["SFT-16bit"]["f1_micro"] == summary["results"]["SFT-16bit"]["f1_micro"]
    assert len(list(Path(cfg.paths.store).glob("sft-*"))) == 1


def test_eval_only_on_a_run_folder_and_refusal_of_unfinished(compose_cfg):
    cfg = compose_cfg(*TINY, "task=banking77", "stage=sft", "stage.eval_points=[sft]")
    summary = run_job(cfg)
    folder = Path(cfg.paths.store) / f"sft-{summary['stages']['sft']['lineage']}"
    ev = run_job(compose_cfg(*TINY, "task=banking77", f"stage.input={folder}", config_name="eval"))
    assert ev["results"]["SFT-16bit"]["f1_micro"] == summary["results"]["SFT-16bit"]["f1_micro"]

    unfinished = Path(cfg.paths.store) / ".partial-sft-deadbeef"
    unfinished.mkdir()
    with pytest.raises(UnfinishedStageError):
        run_job(compose_cfg(*TINY, f"stage.input={unfinished}", config_name="eval"))


def test_crashed_training_resumes_from_its_checkpoint(compose_cfg, monkeypatch):
    import ptq_qlora.training as training
    from transformers import TrainerCallback

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # after checkpoint-2 was written, before checkpoint-4
                raise KeyboardInterrupt("killed")

    overrides = (*TINY, "task=bitext", "sft.save_steps=2", "stage.eval_points=[sft]")
    real_train = training.SFTTrainer.train
    resumed_from = []

    def train(self, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        if len(resumed_from) == 1:
            self.add_callback(KillAtStep3())
        return real_train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(training.SFTTrainer, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run_job(compose_cfg(*overrides))
    store = Path(compose_cfg().paths.store)
    partial = next(store.glob(".partial-sft-*"))
    assert (partial / "checkpoints" / "checkpoint-2").exists()
    assert not list(store.glob("sft-*"))  # nothing unfinished is published

    summary = run_job(compose_cfg(*overrides))
    assert resumed_from[0] is None and resumed_from[1].endswith("checkpoint-2")
    assert "SFT-16bit" in summary["results"]
    assert not list(store.glob(".partial-*"))
