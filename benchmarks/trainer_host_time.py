"""Host time of the stage's Trainer step, on this CPU (no GPU needed): a 32-layer Llama of tiny width
(compute negligible, module count of a 7B) with the GPU profile's model path (fused_lora with
keep_recomputed_weights, the offloaded checkpoint: on a CPU it runs without streams), trained by
`ptq_qlora.training.train_tokenized` and by the peers' plain loop. Prints ms a step for both and, from
cProfile, the Trainer's host work per step outside its training_step: the part a GPU idles through
when a host sync comes before it (benchmarks/RESULTS.md, fifth session).

    python benchmarks/trainer_host_time.py [--steps 12] [--logging-steps 5]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS, SEQ, BATCH = 32, 32, 4
# the Trainer's per-step host work after training_step (transformers 5.2x names)
AFTER_BACKWARD = ("floating_point_ops", "_track_num_input_tokens", "_clip_grad_norm", "wrapper", "zero_grad",
                  "_maybe_log_save_evaluate", "get_batch_samples")


def tiny_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptq_qlora.adapters.fused_lora import fuse_lora_layers

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=259, pad_token_id=258))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    fuse_lora_layers(model, keep_recomputed_weights=True)
    return model


def trainer_step_times(steps: int, logging_steps: int, overrides: dict, profiler=None) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback

    from ptq_qlora import training
    from ptq_qlora.models.tiny import byte_level_tokenizer

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            marks.append(time.perf_counter())

    rows = [{"input_ids": list(range(1, SEQ + 1)), "completion_mask": [1] * SEQ, "length": SEQ}] * (BATCH * steps)
    hw = SimpleNamespace(name="cpu", device="cpu", dtype="float32", train_dtype="float32", train_batch_size=BATCH,
                         grad_accum=1, dataloader_workers=0, gradient_checkpointing=True, activation_offload=True,
                         padding_free=True, pack_length=SEQ, num_processes=1, attn_implementation="sdpa", **overrides)
    cfg = dict(lr=1e-4, scheduler="constant", epochs=1, max_steps=steps, warmup=0, weight_decay=0.0, max_grad_norm=1.0,
               optim="adamw_torch", logging_steps=logging_steps, save_steps=100_000, save_total_limit=1,
               group_by_length=False)
    model = tiny_model()
    if profiler:
        profiler.enable()
    training.train_tokenized(model, byte_level_tokenizer(), Dataset.from_list(rows), cfg, hw,
                             Path(tempfile.mkdtemp()), seed=0, callbacks=[Clock()])
    if profiler:
        profiler.disable()
    return [b - a for a, b in zip(marks, marks[1:])]


def loop_step_times(steps: int) -> list[float]:
    from ptq_qlora.activation_offload import install_offloaded_checkpointing

    model = tiny_model()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    install_offloaded_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.arange(1, SEQ + 1).repeat(BATCH, 1)
    marks = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def host_work_after_backward(profiler: cProfile.Profile, steps: int) -> dict[str, float]:
    """ms a step of each AFTER_BACKWARD function called by the Trainer's epoch loop."""
    stats = pstats.Stats(profiler).stats
    out = {}
    for (filename, _, name), (_, _, _, cumulative, callers) in stats.items():
        if name in AFTER_BACKWARD and any(caller[2] == "_run_epoch" for caller in callers):
            label = "optimizer step" if name == "wrapper" else name
            out[label] = out.get(label, 0.0) + 1e3 * cumulative / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--logging-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    median = lambda times: 1e3 * statistics.median(times[2:])  # noqa: E731
    print(f"{LAYERS} layers of width 64, batch {BATCH} x {SEQ}, {args.steps} steps (median of steps 4..), torch "
          f"{torch.__version__}, 1 thread\n")
    print("| run | ms / step |\n| --- | ---: |")
    print(f"| plain loop (the peers') | {median(loop_step_times(args.steps)):.1f} |")
    print(f"| the stage's Trainer | {median(trainer_step_times(args.steps, args.logging_steps, {})):.1f} |")
    # a second run under cProfile (it slows what it watches). On a CPU everything is synchronous: moving the
    # Trainer's host syncs (deferred_step_syncs) changes nothing here; on a GPU it lets this work overlap the backward
    profiler = cProfile.Profile()
    trainer_step_times(args.steps, args.logging_steps, {}, profiler)
    print("\n| the Trainer's host work after the backward (cProfile) | ms / step |\n| --- | ---: |")
    for name, ms in sorted(host_work_after_backward(profiler, args.steps).items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
