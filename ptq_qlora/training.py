"""Causal-LM fine-tuning shared by the full-SFT and QLoRA stages: TRL's SFTTrainer over
pre-tokenized prompt/completion pairs (loss on the completion only), with checkpoints a crashed
run resumes from.

Several GPUs: launched by torchrun / accelerate launch, the same Trainer runs data-parallel (DDP) or
fully sharded (FSDP2 through Accelerate) as the hardware profile says (ptq_qlora/distributed.py);
`trainer_arguments` (importable without trl, datasets or hydra) builds the arguments both paths and
benchmarks/fsdp_sft.py use, and `save_trained_model` gathers a sharded model into one HF folder.

One-GPU speed options of the hardware profile (all off on the cpu profile; benchmarks/qlora_speed.py
measured each, see benchmarks/RESULTS.md): `padding_free` + `pack_length` (ptq_qlora/packing.py),
`use_liger_kernel` (Liger's Triton RMSNorm/SwiGLU/RoPE kernels through the Trainer),
`activation_offload` (checkpointed layer inputs held in pinned host memory, copied on a side CUDA
stream: ptq_qlora/activation_offload.py), and
`frozen_in_compute_dtype` (LoRA over a 4-bit base: frozen norms/embeddings/lm_head stay bf16 instead
of peft's fp32 upcast, so the residual stream is bf16 as in the model's own training), and
`packed_attention` (the attention implementation for packed rows during training, e.g. flex_attention,
which skips the masked blocks that sdpa computes under a dense block-diagonal mask)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ptq_qlora import distributed
from ptq_qlora.lm_head_scoring import completion_positions_only

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """`training.SFTTrainer` / `training.SFTConfig` stay reachable (tests patch them) while trl is
    imported only when training starts."""
    if name in ("SFTConfig", "SFTTrainer"):
        import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tokenize_for_training(dataset: "Dataset", tokenizer, model_cfg) -> "Dataset":
    """Render each prompt as the model will see it at test time and append the end-of-answer text."""
    from ptq_qlora.models.prompting import completion_suffix, render_prompt
    from ptq_qlora.tokenization import encode_training_example

    suffix = completion_suffix(tokenizer, model_cfg)

    def encode(row):
        completion = row["completion"] if row["completion"].endswith(suffix) else row["completion"] + suffix
        encoded = encode_training_example(tokenizer, render_prompt(tokenizer, model_cfg, row["prompt"]), completion)
        return {**encoded, "length": len(encoded["input_ids"])}  # read by the length-grouped sampler

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing")


@contextlib.contextmanager
def attention_for_packed_rows(model, implementation: str | None):
    """Within the block the model attends with `implementation` (None: unchanged); restored after,
    so evaluation and generation of the same model object use the profile's attn_implementation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    if not implementation or implementation == before:
        yield
        return
    base.set_attn_implementation(implementation)
    log.info("packed rows attend with %s during training (was %s)", implementation, before)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def speed_option(hardware, name: str, default=False):
    """A profile's speed option; profiles written before it existed (and plain namespaces) say `default`."""
    getter = getattr(hardware, "get", None)
    value = getter(name, default) if callable(getter) else getattr(hardware, name, default)
    return default if value is None else value


def prepare_padding_free(train_ds: "Dataset", pack_length: int, max_length: int | None) -> "Dataset":
    """Tokenized rows (`input_ids`, `completion_mask`) -> packed rows for the padding-free path: labels
    from the completion mask, each example truncated to `max_length` (keep the start) and dropped if
    no completion token is left, as TRL does on the padded path, then packed best-fit."""
    from ptq_qlora.packing import pack_dataset

    def to_labels(row):
        ids = row["input_ids"][:max_length] if max_length else row["input_ids"]
        mask = row["completion_mask"][: len(ids)]
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}

    rows = train_ds.map(to_labels, remove_columns=train_ds.column_names, desc="labels for packing")
    rows = rows.filter(lambda row: any(t != -100 for t in row["labels"]), desc="dropping rows without a target")
    if len(rows) == 0:
        raise ValueError("no training row has a completion token left after truncation to max_length")
    return pack_dataset(rows, int(pack_length))


def keep_frozen_in_compute_dtype(model, dtype) -> int:
    """Cast frozen fp32 float weights (what peft's prepare_model_for_kbit_training upcast: norms,
    embeddings, lm_head) back to `dtype`; 4-bit weights and trainable parameters are left alone.
    Returns the number of values cast."""
    import torch

    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32 and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def precision_flags(dtype: str, device: str) -> dict:
    """Mixed precision (autocast) for the Trainer, from the hardware's compute dtype; always
    explicit, since TRL turns bf16 on by default. On CPUs with AVX512-BF16 bf16 autocast trains
    SmolLM2-135M 2.5x faster than fp32 (5.5 vs 14 s a step, see README)."""
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16", "use_cpu": device == "cpu"}


def trainer_arguments(train_cfg: dict, hardware, output_dir: str | Path, seed: int, report_to: str = "none",
                      run_name: str | None = None, peft: bool = False) -> dict:
    """Keyword arguments for `transformers.TrainingArguments` (and TRL's SFTConfig, its subclass):
    the step's hyperparameters, the hardware profile's batch/precision, and, when launched on several
    GPUs, its DDP or FSDP settings (`peft`: LoRA over a frozen base, which uses `qlora_distributed`)."""
    launch = distributed.trainer_distributed_args(hardware, peft=peft)
    activation_offload_applies(launch, hardware)  # a wrong combination fails when the arguments are built
    return dict(
        output_dir=str(output_dir),
        run_name=run_name,
        per_device_train_batch_size=hardware.train_batch_size,
        gradient_accumulation_steps=hardware.grad_accum,
        learning_rate=train_cfg["lr"],
        lr_scheduler_type=train_cfg["scheduler"],
        num_train_epochs=train_cfg["epochs"],
        max_steps=train_cfg["max_steps"],
        warmup_steps=train_cfg["warmup"],
        weight_decay=train_cfg["weight_decay"],
        max_grad_norm=train_cfg["max_grad_norm"],
        optim=optimizer_name(train_cfg["optim"], hardware, launch),
        logging_steps=train_cfg["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train_cfg["save_steps"],
        save_total_limit=train_cfg["save_total_limit"],
        dataloader_num_workers=hardware.dataloader_workers,
        train_sampling_strategy="group_by_length" if train_cfg.get("group_by_length") else "random",
        length_column_name="length",
        seed=seed,
        data_seed=seed,
        report_to=report_to,
        include_num_input_tokens_seen="non_padding",
        # its per-step torch.isnan(loss) is a host sync; off, a NaN loss shows in the logs (ptq_qlora/sft_trainer.py)
        logging_nan_inf_filter=not speed_option(hardware, "deferred_step_syncs"),
        disable_tqdm=not distributed.is_main_process(),
        use_liger_kernel=_liger_available(hardware),
        **precision_flags(hardware.dtype, hardware.device),
        **launch,
    )


def packed_attention_usable(hardware) -> bool:
    """The profile's packed_attention can act on this device (flex attention has no CPU backward)."""
    return not (speed_option(hardware, "packed_attention", None) == "flex_attention" and hardware.device == "cpu")


def optimizer_name(optim: str, hardware, launch: dict) -> str:
    """`fused_optimizer`: torch's AdamW as one fused CUDA kernel per step instead of foreach loops
    (same update rule; the Trainer's `adamw_torch_fused`). CUDA only, not under FSDP (DTensor shards)."""
    if optim == "adamw_torch" and speed_option(hardware, "fused_optimizer") and hardware.device == "cuda" \
            and not launch.get("fsdp"):
        return "adamw_torch_fused"
    return optim


def _liger_available(hardware) -> bool:
    """The profile asks for Liger's kernels and they are installed (the `gpu` extra); a missing
    package costs speed, not correctness, so it is a warning."""
    if not speed_option(hardware, "use_liger_kernel"):
        return False
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("use_liger_kernel: liger-kernel is not installed (pip install '.[gpu]'); training without it")
        return False
    return True


def activation_offload_applies(args: dict, hardware) -> bool:
    """`activation_offload` acts on a run with these Trainer arguments: the profile asks for it and the
    Trainer checkpoints. The Trainer keeps its plain checkpointing arguments; `train_tokenized` then
    swaps in the asynchronous offloaded checkpoint (ptq_qlora/activation_offload.py). Not under FSDP's
    own checkpointing."""
    if not (speed_option(hardware, "activation_offload") and args.get("activation_checkpointing")):
        return False
    if args.get("fsdp"):
        raise ValueError("activation_offload works with the Trainer's checkpointing, not FSDP's; "
                         "use fsdp_cpu_offload for FSDP")
    return True


def save_trained_model(trainer, model, save_dir: str | Path, dtype=None) -> None:
    """Write the trained model (or PEFT adapter) as a normal HF folder, on every launch shape. One
    process: `model.save_pretrained`. DDP: rank 0 saves its replica. FSDP: every rank joins the
    gather of the full state dict (Accelerate, onto rank 0's CPU) and rank 0 saves it, cast back to
    `dtype` (the profile's train_dtype; FSDP keeps fp32 master shards under bf16 mixed precision).
    All ranks return once the folder is complete."""
    save_dir = Path(save_dir)
    accelerator = trainer.accelerator
    if getattr(trainer, "is_fsdp_enabled", False):
        state = accelerator.get_state_dict(trainer.model)  # collective
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(trainer.model)
            is_peft = hasattr(unwrapped, "peft_config")
            if dtype is not None and not is_peft:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            unwrapped.save_pretrained(str(save_dir), state_dict=state)
            config_file = save_dir / "config.json"
            if dtype is not None and not is_peft and config_file.exists():
                # save_pretrained records the sharded (fp32 master) parameters' dtype
                config = json.loads(config_file.read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        del state
    elif accelerator.num_processes > 1:
        if accelerator.is_main_process:
            accelerator.unwrap_model(trainer.model).save_pretrained(str(save_dir))
    else:
        model.save_pretrained(str(save_dir))
    accelerator.wait_for_everyone()


def train_causal_lm(model, tokenizer, train_rows: "Dataset", model_cfg, train_cfg: dict, hardware, out_dir: Path,
                    seed: int, **options) -> dict:
    """Train `model` in place on prompt/completion rows; checkpoints go to `out_dir/checkpoints` and a
    rerun resumes from the newest one. `options` are `train_tokenized`'s (report_to, max_length,
    run_name, save_dir: the trained model, a PEFT model's adapter, saved there as a normal HF folder,
    also when it was sharded over several GPUs). Returns training metrics."""
    _prepare_launch(model, hardware)  # before the (slow) tokenization: a wrong launch fails first
    train_ds = tokenize_for_training(train_rows, tokenizer, model_cfg)
    return train_tokenized(model, tokenizer, train_ds, train_cfg, hardware, out_dir, seed, **options)


def _uses_model_loss(model, arguments: dict, hardware, peft: bool) -> bool:
    """`model_loss` acts on this run (ptq_qlora/sft_trainer.py); Liger's kernels are then applied here,
    its fused loss included, instead of through `arguments`. Not under FSDP (Liger's fused loss would
    read the sharded LM head): TRL's loss there."""
    if not speed_option(hardware, "model_loss"):
        return False
    if distributed.strategy_for(hardware, peft=peft) == "fsdp":
        log.warning("hardware.model_loss is not used under FSDP: TRL's loss")
        return False
    if arguments.get("use_liger_kernel"):
        from ptq_qlora.sft_trainer import apply_liger_with_fused_loss

        apply_liger_with_fused_loss(model)
        arguments["use_liger_kernel"] = False
    elif hardware.device == "cuda":
        log.warning("hardware.model_loss without Liger: the loss materializes the full logits")
    return True


def _prepare_launch(model, hardware) -> bool:
    """Check the launch against the profile and forget a previous Trainer's FSDP; True for a PEFT model."""
    distributed.check_world_size(hardware)
    peft = hasattr(model, "peft_config")
    if distributed.strategy_for(hardware, peft=peft) != "fsdp":
        # Accelerate sets ACCELERATE_USE_FSDP=true for the rest of the process once a Trainer hands
        # it an FSDP plugin (the pipeline's SFT stage on h200x2); a later DDP Trainer (QLoRA) would
        # then get a default FSDP1 plugin from it and fail on the 4-bit base ("Cannot flatten
        # integer dtype tensors"). The profile picks the strategy: forget the earlier one.
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    return peft


def train_tokenized(
    model,
    tokenizer,
    train_ds: "Dataset",
    train_cfg: dict,
    hardware,
    out_dir: Path,
    seed: int,
    report_to: str = "none",
    max_length: int | None = None,
    run_name: str | None = None,
    save_dir: Path | None = None,
    callbacks: list | None = None,
) -> dict:
    """`train_causal_lm` after tokenization: rows of `input_ids` + `completion_mask` (+ `length`).
    `callbacks`: extra TrainerCallbacks (benchmarks/qlora_speed.py times steps with one)."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig

    from ptq_qlora.sft_trainer import configure_trainer, project_trainer_class

    peft = _prepare_launch(model, hardware)
    examples = len(train_ds)
    collator = None
    if speed_option(hardware, "padding_free"):
        from ptq_qlora.packing import PackedRowsCollator

        pack_length = int(speed_option(hardware, "pack_length", 2048))
        train_ds = prepare_padding_free(train_ds, pack_length, max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = PackedRowsCollator(pad_id, width=pack_length)
        max_length = None  # examples are truncated above; TRL would cut packed rows
        log.info("padding-free: %d examples packed into %d rows of <= %s tokens", examples, len(train_ds),
                 speed_option(hardware, "pack_length", 2048))
    if peft and speed_option(hardware, "frozen_in_compute_dtype") and hardware.dtype == "bfloat16":
        from ptq_qlora.models.loading import resolve_dtype

        log.info("frozen fp32 weights cast to bf16: %d values", keep_frozen_in_compute_dtype(model, resolve_dtype("bfloat16")))
    ckpt_dir = out_dir / "checkpoints"
    arguments = trainer_arguments(train_cfg, hardware, ckpt_dir, seed, report_to=report_to, run_name=run_name,
                                  peft=peft)
    model_loss = _uses_model_loss(model, arguments, hardware, peft)
    args = SFTConfig(**arguments, completion_only_loss=True, max_length=max_length)
    callbacks = list(callbacks or [])
    if activation_offload_applies(arguments, hardware):
        from ptq_qlora.activation_offload import offload_callback

        callbacks.append(offload_callback())  # after the Trainer enables checkpointing in train()
    trainer = project_trainer_class()(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                      data_collator=collator, callbacks=callbacks)
    configure_trainer(trainer, model_loss=model_loss, defer_syncs=bool(speed_option(hardware, "deferred_step_syncs")))
    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
    if resume:
        log.info("resuming training from %s", resume)
    started = time.time()
    # only when rows do hold several examples: on rows of one example each, sdpa's flash path is faster
    packed_attention = speed_option(hardware, "packed_attention", None) if len(train_ds) < examples else None
    if packed_attention and not packed_attention_usable(hardware):
        log.warning("packed_attention=flex_attention: torch has no flex backward on CPU; packed rows keep %s",
                    hardware.attn_implementation)
        packed_attention = None
    with completion_positions_only(), attention_for_packed_rows(model, packed_attention):
        result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
    if save_dir is not None:
        from ptq_qlora.models.loading import resolve_dtype

        save_trained_model(trainer, model, save_dir, dtype=None if peft else resolve_dtype(hardware.train_dtype))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen  # all ranks together
    gpus = trainer.accelerator.num_processes
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else math.nan,
        "last_logged_loss": losses[-1] if losses else math.nan,
        "loss_curve": losses,
        "train_seconds": seconds,
        "train_steps": trainer.state.global_step,
        "train_examples": examples,
        "train_rows": len(train_ds),  # packed rows when padding-free
        "train_tokens_seen": int(tokens),
        "train_tokens_per_second": float(tokens) / seconds if seconds > 0 else math.nan,
        "train_tokens_per_second_per_process": float(tokens) / seconds / gpus if seconds > 0 else math.nan,
        "world_size": gpus,
        "distributed": distributed.strategy_for(hardware, peft=peft),
        "padding_free": bool(speed_option(hardware, "padding_free")),
        "resumed_from": resume,
    }
    # rank 0's numbers everywhere: every rank then writes the same metrics.json into the shared folder
    return distributed.broadcast_object(metrics)
