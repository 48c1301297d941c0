"""Several GPUs: who this process is, the one run folder all ranks share, rank-0-only side effects,
sharding an evaluation set, and the Trainer arguments for DDP / FSDP.

Launch one process per GPU with an existing launcher; the sharding itself is HF Accelerate's (through
the Trainer), never our own:

    accelerate launch --num_processes 2 train.py hardware=h200x2 stage=sft model=qwen2-7b
    torchrun --nproc_per_node 2 train.py hardware=h200x2 stage=sft model=qwen2-7b

- Ranks come from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), or from an initialised
  process group. `ensure_process_group` starts one (NCCL for CUDA tensors plus gloo for CPU objects,
  as Accelerate does for FSDP) the first time a barrier or collective is needed; Accelerate then reuses it.
- The Hydra run folder must be the same on every rank: `${run_stamp:FORMAT}` (conf/config.yaml) is
  `PTQ_QLORA_RUN_ID` when set, else rank 0's clock shared with the other ranks through the launcher's
  TCP store (MASTER_ADDR:MASTER_PORT), else (one process) the local clock, like Hydra's `${now:}`.
- Rank 0 alone tracks (W&B) and finalises run-store folders (ptq_qlora/runstore.py); the run store
  must be on a filesystem every rank sees (one node, or a shared disk across nodes).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

ENV_RUN_ID = "PTQ_QLORA_RUN_ID"
STRATEGIES = ("none", "ddp", "fsdp")
STORE_TIMEOUT_S = 300
_STAMPS: dict[str, str] = {}
_STORE = None  # the launcher's TCP store, once opened
_ALONE = False  # inside main_process_only: this process acts as a world of one


# ----------------------------------------------------------------------------- who am I


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    return dist if dist.is_available() else None


def _initialized() -> bool:
    dist = _dist()
    return bool(dist and dist.is_initialized())


def world_size() -> int:
    if _ALONE:
        return 1
    if _initialized():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if _ALONE:
        return 0
    if _initialized():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Started by torchrun / accelerate launch (even with one process): Accelerate then builds the
    DDP/FSDP wrapper; a plain `python train.py` keeps the single-device path."""
    return "LOCAL_RANK" in os.environ or _initialized()


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def local_device() -> str:
    """This rank's device: `cuda:<LOCAL_RANK>` on GPUs, else `cpu`."""
    import torch

    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def ensure_process_group() -> bool:
    """Start the default process group if launched with several processes and none exists yet
    (the run store needs barriers before the Trainer starts one). True when one is up."""
    dist = _dist()
    if dist is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return False
    if not dist.is_initialized():
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            # gloo beside NCCL: CPU object collectives and FSDP's CPU-offloaded full state dicts
            dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timedelta(minutes=60))
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=60))
        log.info("process group started: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return True


def barrier() -> None:
    if is_distributed() and ensure_process_group():
        _dist().barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (itself when not distributed)."""
    if not (is_distributed() and ensure_process_group()):
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (is_distributed() and ensure_process_group()):
        return [obj]
    out: list = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- sharding


def shard_indices(n: int, num_shards: int | None = None, index: int | None = None) -> list[int]:
    """Contiguous, balanced block of range(n) for shard `index` (default: this rank): every item in
    exactly one shard, sizes differ by at most one, and concatenating the shards in order gives range(n)."""
    num_shards = world_size() if num_shards is None else num_shards
    index = rank() if index is None else index
    base, extra = divmod(n, num_shards)
    start = index * base + min(index, extra)
    return list(range(start, start + base + (1 if index < extra else 0)))


def shard_and_gather(items: Sequence, work) -> list:
    """Run `work(list_of_items) -> list_of_results` on this rank's shard of `items`, then gather:
    every rank gets all results in the order of `items`."""
    mine = shard_indices(len(items))
    results = list(work([items[i] for i in mine]))
    if len(results) != len(mine):
        raise RuntimeError(f"rank {rank()}: {len(results)} results for {len(mine)} items")
    gathered = gather_objects(results)
    return [r for part in gathered for r in part]


# ----------------------------------------------------------------------------- rank-0 side effects


def main_process_only(fn):
    """`fn` runs on rank 0 alone, as a one-process job (its run-store barriers and collectives are
    skipped), while the other ranks wait; every rank returns rank 0's result. For the steps that are
    single-GPU work by nature, e.g. post-training quantization. If rank 0 fails, the launcher stops
    the others."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _ALONE
        if not is_distributed():
            return fn(*args, **kwargs)
        ensure_process_group()
        result = None
        if is_main_process():
            _ALONE = True
            try:
                result = fn(*args, **kwargs)
            finally:
                _ALONE = False
        return broadcast_object(result)

    return wrapper


@contextmanager
def main_process_tracker(cfg) -> Iterator[Any]:
    """The job's experiment tracker on rank 0 (ptq_qlora.tracking.tracker_for); None elsewhere, so
    the other ranks log nothing and their Trainers report to no tracker."""
    from ptq_qlora.tracking import tracker_for

    with (tracker_for(cfg) if is_main_process() else nullcontext(None)) as tracker:
        yield tracker


def quiet_other_ranks() -> None:
    """Keep the console readable: ranks other than 0 log warnings and errors only."""
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("ptq_qlora", "transformers", "trl", "accelerate"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")


# ----------------------------------------------------------------------------- one run folder


def _launcher_store():
    """A client of the launcher's TCP store (torchrun's agent store), or for a plain env://
    launch rank 0 hosts a multi-tenant store on MASTER_PORT that init_process_group reuses later."""
    from torch.distributed import TCPStore

    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return TCPStore(host, port, world_size(), is_master=(not agent and rank() == 0),
                    timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False,
                    **({} if agent else {"multi_tenant": True}))


def run_stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The run's folder name part (the `${run_stamp:FMT}` resolver), equal on every rank of a launch."""
    if os.environ.get(ENV_RUN_ID):
        return os.environ[ENV_RUN_ID]
    if fmt in _STAMPS:
        return _STAMPS[fmt]
    if _initialized():
        stamp = broadcast_object(_new_stamp(fmt) if is_main_process() else None)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        stamp = _shared_stamp(fmt)
    else:
        stamp = _new_stamp(fmt)
    _STAMPS[fmt] = stamp
    return stamp


def _new_stamp(fmt: str) -> str:
    # the creating process's id after the time: two jobs started in the same second (two shells, a
    # local sweep launcher) never share a run folder
    return f"{datetime.now().strftime(fmt)}_{os.getpid()}"


def _shared_stamp(fmt: str) -> str:
    global _STORE
    # kept for the life of the process: a store that rank 0 hosts is the one init_process_group
    # reuses later (multi-tenant); closing it would leave the other ranks talking to a dead server
    store = _STORE = _STORE or _launcher_store()
    key = f"ptq_qlora/run_stamp/{os.environ.get('TORCHELASTIC_RUN_ID', 'env')}/{fmt}"
    if is_main_process():
        # compare_set keeps the first value: a restarted group keeps its folder
        stamp = store.compare_set(key, "", _new_stamp(fmt)).decode()
        store.set(key + "/ready", "1")
        deadline = time.time() + STORE_TIMEOUT_S  # keep a self-hosted store up until all have read it
        while store.add(key + "/read", 0) < world_size() - 1 and time.time() < deadline:
            time.sleep(0.05)
    else:
        store.wait([key + "/ready"])
        stamp = store.get(key).decode()
        store.add(key + "/read", 1)
    return stamp


# ----------------------------------------------------------------------------- Trainer arguments


def _get(hardware, key: str, default=None):
    if isinstance(hardware, dict):
        return hardware.get(key, default)
    return getattr(hardware, key, default)


def strategy_for(hardware, peft: bool = False) -> str:
    """The data-parallel strategy for this launch: the profile's (`distributed`, or `qlora_distributed`
    for LoRA over a frozen base), or `none` when not started by a launcher."""
    chosen = _get(hardware, "qlora_distributed" if peft else "distributed", "none") or "none"
    if chosen not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {chosen!r}; known: {', '.join(STRATEGIES)}")
    if not launched() or chosen == "none":
        return "none"
    return chosen


def trainer_distributed_args(hardware, peft: bool = False) -> dict:
    """TrainingArguments for the strategy `strategy_for` picks. Activation checkpointing is FSDP's own
    (checkpoint-wrapped decoder layers) under FSDP, else the Trainer's (non-reentrant)."""
    strategy = strategy_for(hardware, peft)
    checkpointing = bool(_get(hardware, "gradient_checkpointing", False))
    if strategy == "fsdp":
        version = int(_get(hardware, "fsdp_version", 2))
        sharding = _get(hardware, "fsdp_sharding", "full_shard")
        if version == 2 and sharding not in ("full_shard", "shard_grad_op"):
            raise ValueError(f"FSDP2 shards 'full_shard' or 'shard_grad_op', not {sharding!r} (FSDP1 has more)")
        fsdp_config = {
            "version": version,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": _get(hardware, "fsdp_state_dict_type", "SHARDED_STATE_DICT"),
            "reshard_after_forward": (sharding == "full_shard") if version == 2 else sharding,
            "cpu_offload": bool(_get(hardware, "fsdp_cpu_offload", False)),
            "cpu_ram_efficient_loading": bool(_get(hardware, "fsdp_cpu_ram_efficient_loading", False)),
            # a PEFT model already checkpoints through the model (attach_lora)
            "activation_checkpointing": checkpointing and not peft,
        }
        wrap = _get(hardware, "fsdp_wrap_layers")
        if wrap:  # else Accelerate wraps the model's _no_split_modules (its decoder layer)
            fsdp_config["transformer_layer_cls_to_wrap"] = list(wrap)
        if version == 1:
            fsdp_config["use_orig_params"] = not peft
        return {"fsdp": True, "fsdp_config": fsdp_config, "activation_checkpointing": checkpointing and peft,
                "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing and peft else None}
    if strategy == "ddp":
        # non-reentrant checkpointing: reentrant recomputation and DDP's gradient hooks do not mix
        return {"activation_checkpointing": checkpointing,
                "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
                "ddp_find_unused_parameters": False,
                "ddp_bucket_cap_mb": _get(hardware, "ddp_bucket_cap_mb")}
    return {"activation_checkpointing": checkpointing}  # one process: as before


def launch_command(hardware, script: str = "train.py") -> str:
    """The launcher line a profile is meant for (printed by `python -m ptq_qlora.distributed`)."""
    n = int(_get(hardware, "num_processes", 1))
    machines = int(_get(hardware, "num_machines", 1))
    if n <= 1 and machines <= 1:
        return f"python {script} hardware={_get(hardware, 'name')}"
    extra = f" --nnodes {machines} --node_rank $NODE_RANK --master_addr $MASTER_ADDR" if machines > 1 else ""
    return f"torchrun --nproc_per_node {n}{extra} {script} hardware={_get(hardware, 'name')}"


def check_world_size(hardware) -> None:
    """A launch must match the profile: its batch sizes are per GPU and the lineage counts its GPUs."""
    if not launched():
        return
    expected = int(_get(hardware, "num_processes", 1)) * int(_get(hardware, "num_machines", 1))
    if world_size() != expected:
        raise ValueError(
            f"hardware={_get(hardware, 'name')} is written for {expected} process(es) but this launch has "
            f"{world_size()}: choose the profile for this launch (e.g. h200x2 for 2 GPUs) or set "
            f"hardware.num_processes={world_size()}"
        )
