"""Run store: lineage-named folders, atomic completion, reuse, and the unfinished-folder rule."""
import json

import pytest

from ptq_qlora.runstore import RunStore, UnfinishedStageError, is_stage_folder, lineage_of, read_record


def test_lineage_is_stable_and_order_free():
    a = lineage_of("p", train={"lr": 1e-4, "epochs": 2}, task="bitext")
    b = lineage_of("p", task="bitext", train={"epochs": 2, "lr": 1e-4})
    assert a == b
    assert a != lineage_of("p", train={"lr": 2e-4, "epochs": 2}, task="bitext")
    assert a != lineage_of("q", train={"lr": 1e-4, "epochs": 2}, task="bitext")


def test_completed_stage_is_found_and_read(tmp_path):
    store = RunStore(tmp_path)
    assert store.find("sft", "abc") is None
    with store.writing("sft", "abc", {"note": "x"}) as out:
        (out / "metrics.json").write_text(json.dumps({"loss": 1.5}))
        assert not store.final_dir("sft", "abc").exists()  # nothing visible before completion
    record = store.find("sft", "abc")
    assert record is not None and record.metrics == {"loss": 1.5}
    assert record.meta["note"] == "x" and record.meta["lineage"] == "abc"
    assert not store.partial_dir("sft", "abc").exists()


def test_crash_leaves_partial_folder_that_is_never_read_and_is_resumed(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("sft", "abc", {}) as out:
            (out / "checkpoint-5").mkdir()
            raise RuntimeError("killed mid-training")
    partial = store.partial_dir("sft", "abc")
    assert (partial / "checkpoint-5").exists()  # finished work kept for resuming
    assert store.find("sft", "abc") is None
    with pytest.raises(UnfinishedStageError, match="did not finish"):
        read_record(partial)
    with store.writing("sft", "abc", {}) as out:
        assert (out / "checkpoint-5").exists()  # same folder: the trainer resumes from it
    assert store.find("sft", "abc") is not None


def test_force_replaces_a_completed_stage(tmp_path):
    store = RunStore(tmp_path)
    with store.writing("ptq", "l1", {"v": 1}):
        pass
    with store.writing("ptq", "l1", {"v": 2}, force=True):
        pass
    assert store.find("ptq", "l1").meta["v"] == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no stage folder"):
        read_record(tmp_path / "sft-nothere")
    assert not is_stage_folder(tmp_path)


def test_a_stage_completed_meanwhile_by_another_job_is_kept(tmp_path):
    store = RunStore(tmp_path)
    with store.writing("sft", "abc", {"job": 1}):
        pass
    # a second job that checked before the first finished now writes the same lineage
    with store.writing("sft", "abc", {"job": 2}):
        pass
    assert store.find("sft", "abc").meta["job"] == 1
    assert not store.partial_dir("sft", "abc").exists()
