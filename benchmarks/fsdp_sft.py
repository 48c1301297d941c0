"""Full SFT of a 7B-shaped random Llama with FSDP2 through HF Trainer + Accelerate, with the very
arguments the SFT stage builds (`ptq_qlora.training.trainer_arguments` over a hardware profile from
conf/hardware/), on 1..N GPUs. Measures tokens/s per GPU, peak memory per GPU and the loss curve;
optionally gathers the sharded model into one HF folder (`save_trained_model`, as the SFT stage does)
and checks that the folder reloads and computes the same loss.

    torchrun --nproc_per_node 2 benchmarks/fsdp_sft.py --hardware h200x2 --layers 32 --out r.json --save /tmp/ck
    torchrun --nproc_per_node 1 benchmarks/fsdp_sft.py --hardware h200x2 --num-processes 1 --accum 2 ...

Needs torch, transformers, accelerate and pyyaml only (no trl, datasets or hydra): the profile YAML
is merged by hand (its `defaults` chain within conf/hardware/). Random weights: speed and memory do
not depend on their values. Data: random 16-token motifs repeated to the sequence length (a model
learns to copy them within a few steps, so loss curves are informative), every row full length.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[key] = value  # NVLink multicast stays off on shared hosts

import torch  # noqa: E402
import yaml  # noqa: E402


def load_profile(name: str) -> dict:
    """conf/hardware/<name>.yaml with its `defaults` chain (schema defaults, then parents, then itself)."""
    from dataclasses import fields

    merged: dict = {}

    def visit(profile: str) -> None:
        data = yaml.safe_load((ROOT / "conf" / "hardware" / f"{profile}.yaml").read_text())
        for parent in data.pop("defaults", []):
            if parent not in ("hardware_schema", "_self_"):
                visit(parent)
        merged.update(data)

    try:  # schema defaults (needs hydra for the import of the schema module)
        from ptq_qlora.config.schema import HardwareConfig

        base = {f.name: f.default for f in fields(HardwareConfig)}
    except ImportError:
        base = {}
    visit(name)
    return {**base, **merged}


def motif_rows(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        motif = torch.randint(100, min(vocab, 2100), (16,), generator=g)
        ids = motif.repeat(seq // 16 + 1)[:seq]
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(seq, dtype=torch.long)})
    return rows


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(layers: int, device: str, seed: int, hidden: int = 4096, inter: int = 11008, vocab: int = 32000):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         max_position_embeddings=4096,
                         tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialised on the GPU: seconds, not minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hardware", default="h200x2")
    ap.add_argument("--num-processes", type=int, default=None, help="override the profile's (1-GPU baseline)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="per-GPU rows (default: the profile's)")
    ap.add_argument("--accum", type=int, default=None, help="default: the profile's grad_accum")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="gather the model into this HF folder and reload it")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ptq_qlora import distributed
    from ptq_qlora.training import save_trained_model, trainer_arguments

    profile = load_profile(args.hardware)
    if args.num_processes is not None:
        profile["num_processes"] = args.num_processes
    if args.batch is not None:
        profile["train_batch_size"] = args.batch
    if args.accum is not None:
        profile["grad_accum"] = args.accum
    profile["dataloader_workers"] = 0  # rows are tensors already
    if not torch.cuda.is_available():  # CPU smoke run of this script (gloo; Accelerate then runs DDP, not FSDP)
        profile["device"] = "cpu"
    hw = SimpleNamespace(**profile)
    distributed.check_world_size(hw)
    distributed.ensure_process_group()
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.local_device()

    t0 = time.time()
    model = build_model(args.layers, device, args.seed, args.hidden, args.inter, args.vocab)
    sync()
    init_s = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    probe = torch.stack([p.detach().float().sum() for p in list(model.parameters())[:4]]).cpu()
    same_init = all(torch.equal(probe, other) for other in distributed.gather_objects(probe))

    train_cfg = {"lr": args.lr, "scheduler": "constant", "epochs": 1, "max_steps": args.steps, "warmup": 0,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": args.optim, "logging_steps": 1,
                 "save_steps": 10_000, "save_total_limit": 1, "group_by_length": False}
    out_dir = Path(args.save or f"/tmp/fsdp_sft_{os.getpid()}") .with_suffix(".trainer")
    kwargs = trainer_arguments(train_cfg, hw, out_dir, seed=args.seed)
    kwargs.update(remove_unused_columns=False, save_strategy="no")
    targs = TrainingArguments(**kwargs)
    global_rows = hw.train_batch_size * hw.grad_accum * world
    data = motif_rows(global_rows * args.steps, args.seq, args.vocab, args.seed)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    steps = [b - a for a, b in zip(times, times[1:])][1:]  # drop the first two steps (warm-up)
    step_s = statistics.median(steps) if steps else float("nan")
    tokens_per_gpu_step = hw.train_batch_size * hw.grad_accum * args.seq
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # a fixed batch's loss under the trained (sharded) model, for the reload check
    probe_batch = {k: torch.stack([r[k] for r in data[:2]]).to(device) for k in ("input_ids", "labels", "attention_mask")}
    trainer.model.eval()
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss_trained = float(trainer.model(**probe_batch).loss)

    save = {}
    if args.save:
        t0 = time.perf_counter()
        save_trained_model(trainer, model, args.save, dtype=torch.bfloat16)
        save["save_s"] = time.perf_counter() - t0
        if rank == 0:
            from transformers import AutoModelForCausalLM

            files = sorted(p.name for p in Path(args.save).iterdir())
            t0 = time.perf_counter()
            reloaded = AutoModelForCausalLM.from_pretrained(args.save, dtype=torch.bfloat16, device_map=device)
            save["reload_s"] = time.perf_counter() - t0
            reloaded.eval()
            with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss_reloaded = float(reloaded(**probe_batch).loss)
            save.update(files=files, loss_trained=loss_trained, loss_reloaded=loss_reloaded,
                        reload_params=sum(p.numel() for p in reloaded.parameters()),
                        config_dtype=json.loads((Path(args.save) / "config.json").read_text()).get("dtype"),
                        disk_gb=sum(p.stat().st_size for p in Path(args.save).iterdir()) / 1e9)
            del reloaded
        distributed.barrier()

    per_rank = distributed.gather_objects({"rank": rank, "peak_alloc_gib": peak, "peak_reserved_gib": reserved})
    if rank == 0:
        tok_s_gpu = tokens_per_gpu_step / step_s
        result = {
            "hardware": args.hardware, "world_size": world, "layers": args.layers, "params": n_params,
            "per_gpu_batch": hw.train_batch_size, "grad_accum": hw.grad_accum, "seq": args.seq,
            "global_rows_per_step": global_rows, "steps": args.steps, "optim": args.optim, "lr": args.lr,
            "strategy": distributed.strategy_for(hw), "fsdp_config": kwargs.get("fsdp_config"),
            "init_s": init_s, "same_init_on_all_ranks": same_init, "train_s": train_s,
            "step_times_s": steps, "median_step_s": step_s, "tokens_per_gpu_step": tokens_per_gpu_step,
            "tok_s_per_gpu": tok_s_gpu, "tok_s_total": tok_s_gpu * world,
            "model_tflops_per_gpu": tok_s_gpu * (6 * n_params + 12 * args.layers * args.seq * args.hidden) / 1e12,
            "losses": losses, "memory": per_rank, "save": save,
            "versions": {"torch": torch.__version__, **{m: __import__(m).__version__ for m in ("transformers", "accelerate")}},
            "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("world_size", "layers", "median_step_s", "tok_s_per_gpu", "losses",
                                                  "memory", "save", "same_init_on_all_ranks")}, default=str))
    distributed.barrier()


if __name__ == "__main__":
    main()
