"""QLoRA data-parallel on 1..N GPUs: LoRA r16 over a bitsandbytes NF4 base of a 7B-shaped random
Llama, through the project's own pieces: the bnb quantizer (`ptq_qlora.quantizers.quantize`), the
training load (`load_quantized(..., for_training=True)`: the base on cuda:LOCAL_RANK), `attach_lora`,
and the Trainer arguments the QLoRA stage builds (`trainer_arguments(..., peft=True)`: the profile's
`qlora_distributed`, DDP or FSDP2), with `transformers.Trainer`. Measures tokens/s per GPU, peak
memory per GPU and the loss curve; saves the adapter as the stage does (`save_trained_model`).

    python benchmarks/qlora_dp.py make --dir /tmp/q7b --layers 32          # bf16 source + NF4 copy
    torchrun --nproc_per_node 1 benchmarks/qlora_dp.py train --dir /tmp/q7b --num-processes 1 --accum 2 --out a.json
    torchrun --nproc_per_node 2 benchmarks/qlora_dp.py train --dir /tmp/q7b --accum 1 --out b.json
    torchrun --nproc_per_node 2 benchmarks/qlora_dp.py train --dir /tmp/q7b --accum 1 --strategy fsdp --out c.json

Data and timing as in fsdp_sft.py: rows of `--seq` tokens (random 16-token motifs repeated), the same
rows per optimizer step on 1 and N GPUs (1 GPU: grad_accum N), median step time over steps 3..N.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_sft import build_model, load_profile, motif_rows, sync  # noqa: E402  (sets NCCL env, ROOT on path)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qcfg():
    from ptq_qlora.quantizers import QuantizerConfig

    return QuantizerConfig(name="bnb-nf4", method="bnb", label="PTQ-BNB-4bit", bits=4, quant_type="nf4",
                           double_quant=True, verify_reload=False)


def make(args) -> None:
    from ptq_qlora.quantizers import quantize

    src, dst = Path(args.dir) / "bf16", Path(args.dir) / "nf4"
    t0 = time.perf_counter()
    model = build_model(args.layers, "cuda:0" if CUDA else "cpu", args.seed, args.hidden, args.inter, args.vocab)
    model.save_pretrained(str(src))
    save_s = time.perf_counter() - t0
    del model
    if CUDA:
        torch.cuda.empty_cache()
    stats = quantize(qcfg(), src, dst, tokenizer=None, calibration_texts=[], compute_dtype="bfloat16")
    stats["build_and_save_bf16_s"] = save_s
    print(json.dumps(stats))
    Path(args.out).write_text(json.dumps(stats, indent=2))


def train(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ptq_qlora import distributed
    from ptq_qlora.adapters import attach_lora, parameter_counts
    from ptq_qlora.quantizers import load_quantized
    from ptq_qlora.quantizers.bnb import use_float_quant_storage
    from ptq_qlora.quantizers.common import model_memory_bytes
    from ptq_qlora.training import save_trained_model, trainer_arguments

    profile = load_profile(args.hardware)
    if args.num_processes is not None:
        profile["num_processes"] = args.num_processes
    profile.update(train_batch_size=args.batch, grad_accum=args.accum, dataloader_workers=0,
                   qlora_distributed=args.strategy)
    if not CUDA:  # CPU smoke run of this script (gloo)
        profile["device"] = "cpu"
    hw = SimpleNamespace(**profile)
    distributed.check_world_size(hw)
    distributed.ensure_process_group()
    rank, world = distributed.rank(), distributed.world_size()
    strategy = distributed.strategy_for(hw, peft=True)

    t0 = time.perf_counter()
    model = load_quantized(qcfg(), Path(args.dir) / "nf4", "bfloat16", for_training=True)
    sync()
    load_s = time.perf_counter() - t0
    base_bytes = model_memory_bytes(model)
    torch.manual_seed(args.seed)  # same LoRA init on every rank and every launch shape
    model = attach_lora(model, TARGETS, r=args.r, alpha=2 * args.r, dropout=args.dropout,
                        gradient_checkpointing=hw.gradient_checkpointing)
    if strategy == "fsdp":
        use_float_quant_storage(model, torch.bfloat16)
    counts = parameter_counts(model)

    train_cfg = {"lr": args.lr, "scheduler": "constant", "epochs": 1, "max_steps": args.steps, "warmup": 0,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 1,
                 "save_steps": 10_000, "save_total_limit": 1, "group_by_length": False}
    kwargs = trainer_arguments(train_cfg, hw, f"/tmp/qlora_dp_{os.getpid()}", seed=args.seed, peft=True)
    kwargs.update(remove_unused_columns=False, save_strategy="no")
    targs = TrainingArguments(**kwargs)
    global_rows = args.batch * args.accum * world
    vocab = model.config.vocab_size
    data = motif_rows(global_rows * args.steps, args.seq, vocab, args.seed)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    steps = [b - a for a, b in zip(times, times[1:])][1:]  # drop the first two steps (warm-up)
    step_s = statistics.median(steps) if steps else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if CUDA else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    wrapped = type(trainer.model_wrapped).__name__
    # DDP keeps one replica per GPU: the trained LoRA weights must be identical on every rank
    lora = [p.detach().float() for n, p in trainer.model.named_parameters() if "lora_" in n]
    checksum = float(sum(t.sum() for t in lora).cpu()) if strategy != "fsdp" else None
    sums = distributed.gather_objects(checksum)

    per_rank = distributed.gather_objects({"rank": rank, "peak_alloc_gib": peak, "peak_reserved_gib": reserved})
    result = {}
    if rank == 0:
        tokens_per_gpu_step = args.batch * args.accum * args.seq
        tok_s_gpu = tokens_per_gpu_step / step_s
        result = {
            "hardware": args.hardware, "strategy": strategy, "wrapped_as": wrapped, "world_size": world,
            "layers": model.config.num_hidden_layers, "per_gpu_batch": args.batch, "grad_accum": args.accum,
            "seq": args.seq, "global_rows_per_step": global_rows, "steps": args.steps, "lr": args.lr,
            "lora_r": args.r, "lora_dropout": args.dropout, "param_counts": counts,
            "base_gpu_bytes": base_bytes, "load_s": load_s, "train_s": train_s, "step_times_s": steps,
            "median_step_s": step_s, "tokens_per_gpu_step": tokens_per_gpu_step, "tok_s_per_gpu": tok_s_gpu,
            "tok_s_total": tok_s_gpu * world, "losses": losses, "grad_norms": norms, "memory": per_rank,
            "lora_checksum_per_rank": sums, "fsdp_config": kwargs.get("fsdp_config"),
            "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "accelerate", "peft", "bitsandbytes")},
            "gpu": torch.cuda.get_device_name() if CUDA else "cpu",
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("strategy", "wrapped_as", "world_size", "median_step_s", "tok_s_per_gpu",
                                                  "losses", "memory", "lora_checksum_per_rank")}, default=str))

    # the adapter, saved as the QLoRA stage saves it (rank 0 writes; FSDP gathers the shards first)
    save_dir = Path(f"/tmp/qlora_dp_adapter_{strategy}_{world}")
    save: dict = {}
    t0 = time.perf_counter()
    try:
        save_trained_model(trainer, model, save_dir)
        save["save_s"] = time.perf_counter() - t0
        if rank == 0:
            from safetensors.torch import load_file

            save["files"] = {p.name: p.stat().st_size for p in sorted(save_dir.iterdir())}
            adapter = load_file(str(save_dir / "adapter_model.safetensors"))
            save.update(tensors=len(adapter), params=sum(t.numel() for t in adapter.values()),
                        dtypes=sorted({str(t.dtype) for t in adapter.values()}),
                        checksum=float(sum(t.float().sum() for t in adapter.values())))
    except Exception as exc:  # keep the throughput numbers; report the failure
        save["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"rank {rank}: adapter save failed: {save['error']}", flush=True)
    if rank == 0:
        result["save"] = save
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({"save": save}, default=str))
    distributed.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("make", "train"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hardware", default="h200x2")
    ap.add_argument("--num-processes", type=int, default=None, help="override the profile's (1-GPU baseline)")
    ap.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0, help="0: 1 and N GPUs see identical computations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    make(args) if args.mode == "make" else train(args)


if __name__ == "__main__":
    main()
