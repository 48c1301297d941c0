"""Several GPUs without GPUs: launch settings compose for every hardware profile, and the multi-process
plumbing (rank-0 tracking, one run folder for all ranks, rank-0 run-store marker, sharded eval
gathering) is exercised by real process groups of 2 on CPU (gloo), and once through torchrun."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq_qlora import distributed
from ptq_qlora.config import CONF_DIR, setup
from ptq_qlora.training import trainer_arguments

setup()
ROOT = CONF_DIR.parent
PROFILES = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))
TRAIN = {"lr": 1e-4, "scheduler": "cosine", "epochs": 1, "max_steps": -1, "warmup": 0, "weight_decay": 0.0,
         "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 1, "save_steps": 50,
         "save_total_limit": 1, "group_by_length": True}


def hardware(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hardware={name}", *overrides])
    return cfg.hardware


@contextmanager
def launch_env(world: int, rank: int = 0):
    """The environment torchrun gives one worker (without starting a process group)."""
    keys = ("LOCAL_RANK", "RANK", "WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- launch settings


@pytest.mark.parametrize("name", PROFILES)
def test_launch_config_composes_for_every_hardware_profile(name):
    hw = hardware(name)
    plain = OmegaConf.to_container(hw, resolve=True)
    assert plain["distributed"] in distributed.STRATEGIES and plain["qlora_distributed"] in distributed.STRATEGIES
    with launch_env(hw.num_processes * hw.num_machines):
        distributed.check_world_size(hw)
        for peft in (False, True):
            args = trainer_arguments(TRAIN, hw, "/tmp/unused", seed=0, peft=peft)
            strategy = distributed.strategy_for(hw, peft=peft)
            assert strategy == (hw.qlora_distributed if peft else hw.distributed)
            assert ("fsdp" in args) == (strategy == "fsdp")
            if strategy == "fsdp":
                _check_fsdp_args(args, hw, peft)
            if strategy == "ddp":
                assert args["ddp_find_unused_parameters"] is False
    command = distributed.launch_command(hw)
    assert f"hardware={name}" in command
    assert ("--nproc_per_node" in command) == (hw.num_processes > 1)


def _check_fsdp_args(args: dict, hw, peft: bool) -> None:
    """What Transformers and Accelerate make of the arguments: FSDP2, full shard, sharded
    checkpoints, FSDP's own activation checkpointing (never both kinds), bf16 mixed precision."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    holder = SimpleNamespace(fsdp=args["fsdp"], fsdp_config=dict(args["fsdp_config"]),
                             activation_checkpointing=args["activation_checkpointing"],
                             _apply_legacy_fsdp_to_config=TrainingArguments._apply_legacy_fsdp_to_config)
    plugin = FullyShardedDataParallelPlugin(**TrainingArguments._process_fsdp_args(holder))
    assert plugin.fsdp_version == hw.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.activation_checkpointing == (hw.gradient_checkpointing and not peft)
    assert not (plugin.activation_checkpointing and args["activation_checkpointing"])
    assert args["bf16"] is (hw.dtype == "bfloat16")


def test_multi_gpu_profiles_keep_the_one_gpu_recipe_and_lineage():
    from ptq_qlora.stages.lineage import sft_lineage

    def effective(hw):
        return hw.train_batch_size * hw.grad_accum * hw.num_processes * hw.num_machines

    assert effective(hardware("h200x2")) == effective(hardware("h200")) == effective(hardware("a100x8"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        one = compose(config_name="config", overrides=["hardware=h100"])
        two = compose(config_name="config", overrides=["hardware=h100x2"])
    assert sft_lineage(one, "base") == sft_lineage(two, "base")


def test_a_launch_that_does_not_match_the_profile_fails():
    with launch_env(4), pytest.raises(ValueError, match="written for 2 process"):
        distributed.check_world_size(hardware("h200x2"))
    distributed.check_world_size(hardware("h200x2"))  # not launched: nothing to check


def test_not_launched_keeps_the_single_process_arguments():
    args = trainer_arguments(TRAIN, hardware("h200x2"), "/tmp/unused", seed=0)
    assert "fsdp" not in args and args["activation_checkpointing"] is True
    assert distributed.strategy_for(hardware("h200x2")) == "none"


def test_shards_cover_everything_once_in_order():
    for n in (0, 1, 5, 16, 17):
        for shards in (1, 2, 3, 8):
            parts = [distributed.shard_indices(n, shards, i) for i in range(shards)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ----------------------------------------------------------------------------- process groups of 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path: Path, *args, world: int = 2) -> list[dict]:
    """Run fn(rank, world, tmp, *args) in `world` CPU processes; each returns a JSON-able dict."""
    port = _free_port()
    mp.spawn(_entry, args=(world, port, fn, str(tmp_path), args), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _entry(rank: int, world: int, port: int, fn, tmp: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), WANDB_MODE="disabled")
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.pop(distributed.ENV_RUN_ID, None)
    result = fn(rank, world, Path(tmp), *args)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _session_worker(rank, world, tmp):
    """One 2-process session (processes are slow to start): every check below runs in it, in order."""
    import logging

    import torch.distributed as dist

    import ptq_qlora.tracking as tracking
    from ptq_qlora.runstore import RunStore

    out: dict = {}
    # 1. the run folder before any process group exists (Hydra resolves it first): rank 0's clock
    #    through a TCP store on MASTER_PORT, even though rank 1 looks at its clock later
    if rank == 1:
        time.sleep(1.5)
    out["stamp_env"] = [distributed.run_stamp("%H-%M-%S.%f"), distributed.run_stamp("%H-%M-%S.%f")]

    # 2. tracking on rank 0 only; the others log warnings only
    started = []

    @contextmanager
    def fake_tracker_for(cfg):
        started.append(rank)
        yield f"tracker-of-rank-{rank}"

    tracking.tracker_for = fake_tracker_for
    with distributed.main_process_tracker(SimpleNamespace()) as tracker:
        pass
    distributed.quiet_other_ranks()
    out.update(tracker=tracker, started=started, root_level=logging.getLogger().level)

    # 3. the run store starts the (gloo) group lazily; all ranks write, rank 0 marks and renames
    store = RunStore(tmp / "runs")
    with store.writing("sft", "abc123", {"who": rank}) as folder:
        if rank == 1:
            time.sleep(1.0)  # rank 0 must wait for this rank's part before marking the stage
        (folder / f"part{rank}.txt").write_text(str(rank))
    final = store.final_dir("sft", "abc123")
    out.update(partial=str(folder), after=sorted(p.name for p in final.iterdir()),
               meta_who=json.loads((final / "stage.json").read_text())["who"],
               found=store.find("sft", "abc123") is not None, group=dist.is_initialized())

    # 4. inside a process group the stamp is rank 0's, broadcast
    if rank == 1:
        time.sleep(1.0)
    out["stamp_group"] = distributed.run_stamp("%M-%S.%f")

    # 5. evaluation: each rank generates its shard, all get every result in order, rank 0's metrics
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return [p.upper() for p in prompts]

    prompts = [f"p{i}" for i in range(7)]
    out.update(seen=seen, all=distributed.shard_and_gather(prompts, generate),
               metrics=distributed.broadcast_object({"f1": 0.5} if rank == 0 else None))

    # 6. a one-GPU step (quantization) on rank 0 alone: its own run-store barriers must not wait
    #    for the others, which get its result
    ran = []

    def quantize():
        ran.append(rank)
        with store.writing("ptq", "def456", {}) as folder:
            (folder / "weights").write_text("4-bit")
        return {"world_inside": distributed.world_size(), "path": str(store.final_dir("ptq", "def456"))}

    out.update(single=distributed.main_process_only(quantize)(), single_ran=ran,
               single_found=store.find("ptq", "def456") is not None)
    return out


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg")
    return tmp, _spawn(_session_worker, tmp)


def test_only_rank_zero_tracks(session):
    _, results = session
    assert results[0]["tracker"] == "tracker-of-rank-0" and results[0]["started"] == [0]
    assert results[1]["tracker"] is None and results[1]["started"] == []  # no W&B run, Trainer reports to none
    assert results[1]["root_level"] >= 30  # other ranks log warnings only


def test_all_ranks_agree_on_the_run_folder(session):
    _, results = session
    for key in ("stamp_env",):
        assert results[0][key][0] == results[1][key][0] == results[0][key][1] == results[1][key][1]
    assert results[0]["stamp_group"] == results[1]["stamp_group"]


def test_run_id_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv(distributed.ENV_RUN_ID, "my-run")
    assert distributed.run_stamp("%Y") == "my-run"


def test_run_store_all_ranks_write_rank_zero_marks(session):
    tmp, results = session
    assert results[0]["partial"] == results[1]["partial"]  # one partial folder for all ranks
    for r in results:
        assert r["after"] == ["completed", "part0.txt", "part1.txt", "stage.json"]
        assert r["found"]  # every rank sees the finished stage when `writing` returns
        assert r["meta_who"] == 0  # rank 0 wrote the record
        assert r["group"]  # the store started the process group itself
    assert not list((tmp / "runs").glob(".partial-*"))


def test_evaluation_is_sharded_and_gathered_in_order(session):
    _, results = session
    assert results[0]["seen"] == ["p0", "p1", "p2", "p3"] and results[1]["seen"] == ["p4", "p5", "p6"]
    for r in results:
        assert r["all"] == [f"P{i}" for i in range(7)]
        assert r["metrics"] == {"f1": 0.5}


# ----------------------------------------------------------------------------- through torchrun


HYDRA_APP = textwrap.dedent("""
    import os, hydra
    from hydra.core.hydra_config import HydraConfig
    from ptq_qlora.config import CONF_DIR, setup
    setup()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def main(cfg):
        with open(os.path.join(os.environ["STAMP_DIR"], "rank" + os.environ["RANK"]), "w") as f:
            f.write(HydraConfig.get().runtime.output_dir + "\\n" + cfg.paths.output_dir)

    main()
""")


def test_torchrun_workers_share_the_hydra_output_folder(tmp_path):
    """The real launcher (its agent store) and the real conf/config.yaml `hydra.run.dir`."""
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP)
    env = {**os.environ, "STAMP_DIR": str(tmp_path), "PTQ_QLORA_ROOT": str(tmp_path / "root"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(distributed.ENV_RUN_ID, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(app), "hydra/job_logging=none", "hydra/hydra_logging=none"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    dirs = [(tmp_path / f"rank{r}").read_text().splitlines() for r in range(2)]
    assert dirs[0] == dirs[1]
    assert dirs[0][0] == dirs[0][1] and dirs[0][0].startswith(str(tmp_path / "root" / "outputs"))
    assert len(list((tmp_path / "root" / "outputs" / "default").iterdir())) == 1


def test_one_gpu_steps_run_on_rank_zero_alone(session):
    _, results = session
    assert results[0]["single_ran"] == [0] and results[1]["single_ran"] == []
    for r in results:
        assert r["single"]["world_inside"] == 1 and r["single_found"]
        assert r["single"] == results[0]["single"]


def test_a_ddp_trainer_after_an_fsdp_one_forgets_fsdp(monkeypatch, compose_cfg, tmp_path):
    """Accelerate leaves ACCELERATE_USE_FSDP=true behind after an FSDP Trainer (the pipeline's SFT);
    the QLoRA stage's DDP Trainer in the same process must not inherit it."""
    import ptq_qlora.training as training

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    seen = {}

    def stop_at_tokenize(*args, **kwargs):
        seen["fsdp_env"] = os.environ.get("ACCELERATE_USE_FSDP")
        raise RuntimeError("stop here")

    monkeypatch.setattr(training, "tokenize_for_training", stop_at_tokenize)
    cfg = compose_cfg("hardware=cpu")
    with pytest.raises(RuntimeError, match="stop here"):
        training.train_causal_lm(model=torch.nn.Linear(2, 2), tokenizer=None, train_rows=[], model_cfg=cfg.model,
                                 hardware=cfg.hardware, train_cfg=cfg.sft, out_dir=tmp_path, seed=0)
    assert seen["fsdp_env"] is None


def test_two_jobs_started_in_the_same_second_get_their_own_run_folder():
    code = "from ptq_qlora.distributed import run_stamp; print(run_stamp('%Y-%m-%d_%H-%M'))"
    env = {k: v for k, v in os.environ.items() if k not in (distributed.ENV_RUN_ID, "WORLD_SIZE", "RANK")}
    jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    stamps = [job.communicate(timeout=120)[0].strip() for job in jobs]
    assert all(stamps) and stamps[0] != stamps[1], stamps
