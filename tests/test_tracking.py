"""W&B tracking, offline: runs made through `tracker_for` are read back from their own files (the
`.wandb` transaction log and the media files), not from mocks."""
import json
import struct
import time
from pathlib import Path

import pytest

from conftest import TINY
from ptq_qlora.tracking import resolve_mode, run_group, tracker_for


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """conftest disables W&B; these tests run it offline with every W&B folder under tmp_path."""
    for var, sub in [("WANDB_DIR", "wandb"), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def read_records(run_dir: Path) -> list:
    """The records of a run's `.wandb` file (LevelDB-log framing: 7-byte file header, 32 KiB
    blocks, each chunk `crc32 | length u16 | type u8`; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """Run record (group, job type, tags), config, flat summary, history keys, artifacts, exit code.
    wandb-core may still be writing the log when `finish()` returns: wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            by_type = {}
            for record in read_records(run_dir):
                by_type.setdefault(record.WhichOneof("record_type"), []).append(record)
        except Exception:  # a chunk still being written
            by_type = {}
        if "exit" in by_type or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    def flat(items, into):
        for item in items:
            *parents, last = [item.key] if item.key else list(item.nested_key)
            node = into
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = json.loads(item.value_json)
        return into

    run = by_type["run"][0].run
    config = flat(run.config.update, {})
    for record in by_type.get("config", []):
        flat(record.config.update, config)
    summary = {}
    for record in by_type.get("summary", []):
        flat(record.summary.update, summary)
    history_keys = {item.key or item.nested_key[0] for r in by_type.get("history", []) for item in r.history.item}
    return {
        "id": run.run_id, "group": run.run_group, "job_type": run.job_type,
        "tags": list(by_type["run"][-1].run.tags),  # tags set during the run come as run updates
        "config": config, "summary": summary, "history_keys": history_keys,
        "artifacts": [r.artifact for r in by_type.get("artifact", []) if r.artifact.type != "run_table"],
        "exit_code": by_type["exit"][0].exit.exit_code if "exit" in by_type else None,
    }


def job_run_dir(tracker) -> Path:
    return Path(tracker.run.dir).parent  # run.dir is <run folder>/files


def test_offline_run_holds_config_metrics_group_and_tags(compose_cfg, offline):
    import wandb

    cfg = compose_cfg("model=tiny-random", "logger=wandb", "logger.tags=[smoke]")
    with tracker_for(cfg) as tracker:
        assert tracker.report_to == "wandb" and wandb.run is tracker.run
        tracker.log_metrics({"f1_micro": 0.5, "n": 3, "curve": [1, 2], "model": {"x": 1}}, prefix="eval/sft")
        tracker.log_metrics({"train_loss": 1.25}, prefix="sft/train", reused=True)
        run_dir = job_run_dir(tracker)
    assert wandb.run is None
    assert run_dir.is_relative_to(Path(cfg.paths.output_dir) / "wandb") and run_dir.name.startswith("offline-run-")

    run = read_run(run_dir)
    config = run["config"]
    assert config["model"]["name"] == "tiny-random" and config["stage"]["name"] == "sft"
    assert config["paths"]["output_dir"] == cfg.paths.output_dir  # resolved, plain containers
    assert config["seed"] == cfg.seed and "git_commit" in config and config["versions"]["transformers"]
    assert run["summary"]["eval/sft/f1_micro"] == 0.5 and run["summary"]["eval/sft/n"] == 3
    assert run["summary"]["eval/sft/reused"] == 0 and "eval/sft/curve" not in run["summary"]
    assert run["summary"]["sft/train/train_loss"] == 1.25 and run["summary"]["sft/train/reused"] == 1
    assert run["group"] == run_group(cfg) and run["group"].startswith("sft-")
    assert run["job_type"] == "sft"
    assert {"model:tiny-random", "quantizer:none", "task:bitext", "stage:sft", "smoke"} <= set(run["tags"])
    assert run["exit_code"] == 0


def test_a_failing_job_still_finishes_its_run_with_exit_code_1(compose_cfg, offline):
    import wandb

    cfg = compose_cfg("model=tiny-random", "logger=wandb")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker_for(cfg) as tracker:
            run_dir = job_run_dir(tracker)
            raise RuntimeError("boom")
    assert wandb.run is None
    assert read_run(run_dir)["exit_code"] == 1


def test_sequential_jobs_get_their_own_runs(compose_cfg, offline):
    ids = []
    for lr in ("1e-4", "2e-4"):  # what a Hydra multirun does in one process
        with tracker_for(compose_cfg("model=tiny-random", "logger=wandb", "stage=qlora", f"stage.lr={lr}")) as tracker:
            ids.append(tracker.run.id)
            tracker.log_metrics({"lr": float(lr)}, prefix="qlora/train")
            run_dir = job_run_dir(tracker)
        assert read_run(run_dir)["summary"]["qlora/train/lr"] == float(lr)  # nothing merged
    assert ids[0] != ids[1]
    assert len(list((Path(compose_cfg().paths.output_dir) / "wandb").glob("offline-run-*"))) == 2


def test_logger_none_yields_no_tracker(compose_cfg):
    with tracker_for(compose_cfg("logger=none")) as tracker:
        assert tracker is None


def test_group_is_the_sft_lineage_shared_downstream(compose_cfg):
    sft = run_group(compose_cfg("model=tiny-random", "stage=sft"))
    assert sft == run_group(compose_cfg("model=tiny-random", "stage=pipeline", "quantizer=bnb-nf4", "stage.lr=5e-4"))
    assert sft == run_group(compose_cfg("model=tiny-random", "stage=qlora", "quantizer=gptq-4bit"))
    assert sft != run_group(compose_cfg("model=tiny-random", "stage=sft", "sft.lr=3e-3"))
    assert run_group(compose_cfg("model=tiny-random", config_name="eval")).startswith("base-")
    assert run_group(compose_cfg("logger=wandb", "logger.group=mine")) == "mine"


def test_mode_auto_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"  # logger.mode forces it
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    with pytest.raises(ValueError, match="auto"):
        resolve_mode("sometimes")


def test_tiny_sft_job_logs_training_eval_predictions_and_artifacts(compose_cfg, offline):
    from ptq_qlora.stages.runner import run_job

    overrides = (*TINY, "task=bitext", "logger=wandb", "stage.eval_points=[sft]", "sft.max_steps=3")
    cfg = compose_cfg(*overrides)
    with tracker_for(cfg) as tracker:
        summary = run_job(cfg, tracker)
        run_dir = job_run_dir(tracker)
    assert len(list(run_dir.parent.glob("offline-run-*"))) == 1  # HF's WandbCallback joined our run
    run = read_run(run_dir)
    sft_lineage = summary["stages"]["sft"]["lineage"]
    assert run["group"] == f"sft-{sft_lineage}" and run["exit_code"] == 0
    s = run["summary"]
    assert s["eval/sft/f1_micro"] == summary["results"]["SFT-16bit"]["f1_micro"]
    assert "sft/train/train_loss" in s and s["eval/sft/reused"] == 0
    assert "train/loss" in run["history_keys"]  # TRL's per-step logging, same run
    assert run["config"]["stages"]["sft"]["artifact"] == f"sft-{sft_lineage}"

    assert s["eval/sft/predictions"]["_type"] == "table-file"
    tables = list((run_dir / "files" / "media" / "table" / "eval" / "sft").glob("predictions_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert {"id", "prediction", "reference", "correct"} <= set(table["columns"]) and len(table["data"]) == 12

    artifacts = {a.name: a for a in run["artifacts"]}
    sft = artifacts[f"sft-{sft_lineage}"]
    assert sft.type == "model" and json.loads(sft.metadata)["parents"][0].startswith("base-")
    entries = {e.path: e for e in sft.manifest.contents}
    weights = next(e for p, e in entries.items() if p.endswith(".safetensors"))
    assert weights.ref.startswith("file://") and Path(weights.ref[len("file://"):]).exists()  # not uploaded
    assert any(name.startswith("eval-") for name in artifacts)

    # the same job again: every stage reused, still visible in its own run
    cfg = compose_cfg(*overrides)
    with tracker_for(cfg) as tracker:
        run_job(cfg, tracker)
        again_dir = job_run_dir(tracker)
    again = read_run(again_dir)
    assert again["id"] != run["id"] and again["group"] == run["group"]
    assert again["summary"]["sft/train/reused"] == 1 and again["summary"]["eval/sft/reused"] == 1
    assert again["summary"]["eval/sft/f1_micro"] == s["eval/sft/f1_micro"]
    assert {"reused:sft", "reused:eval-sft"} <= set(again["tags"])
    assert list((again_dir / "files" / "media" / "table" / "eval" / "sft").glob("predictions_*.table.json"))
