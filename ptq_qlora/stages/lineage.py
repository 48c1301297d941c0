"""What shapes each stage's output, hashed into its lineage. Machine-specific paths (data dir,
store) and settings that do not change results (eval batch size, logging) stay out, so the same
experiment on another machine has the same lineage."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ptq_qlora.runstore import lineage_of

# data settings that select where rows come from, not which rows: not part of the lineage
_DATA_LOCATION_KEYS = ("local_dir", "source")
# task settings that score outputs, not shape data or models: only the eval lineage sees them
_TASK_SCORING_KEYS = ("alignscore",)
# quantizer settings that only change how a checkpoint is made, loaded or checked, not its weights
# (kernels, the reload check, gptqmodel's packing implementation: same bytes)
_QUANTIZER_LOADING_KEYS = ("verify_reload", "backend_eval", "backend_train", "cpu_packed_eval", "pack_impl")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _set_values(node: dict) -> dict:
    # unset (None) settings are left out, so adding an optional config field keeps old lineages
    return {k: v for k, v in node.items() if v is not None}


def data_identity(cfg) -> dict:
    data = {k: v for k, v in _plain(cfg.data).items() if k not in _DATA_LOCATION_KEYS}
    task = {k: v for k, v in _plain(cfg.task).items() if k not in _TASK_SCORING_KEYS}
    return {"task": _set_values(task), "data": _set_values(data)}


def prompt_identity(cfg) -> dict:
    return {"chat_template": cfg.model.chat_template, "prompt_template": cfg.model.prompt_template}


def train_settings(cfg, step: str) -> dict:
    """The step's hyperparameters, with the `stage.lr/scheduler/epochs` shortcuts applied when
    this job's stage trains that step."""
    settings = _plain(cfg[step])
    if cfg.stage.trains == step:
        for key in ("lr", "scheduler", "epochs"):
            if cfg.stage[key] is not None:
                settings[key] = cfg.stage[key]
    return settings


# Hardware speed options that change what training computes (batch composition, rounding): in the
# lineage only when on, so runs without them keep the lineage they had before the options existed.
# The QLoRA-only ones act on LoRA over a 4-bit base.
_ARITHMETIC_OPTIONS = {"sft": ("padding_free", "use_liger_kernel", "fused_optimizer", "model_loss"),
                       "qlora": ("padding_free", "use_liger_kernel", "fused_optimizer", "model_loss", "frozen_in_compute_dtype",
                                 "dequantize_frozen_base", "gptq_dequant_matmul", "fused_lora",
                                 "compile_layers")}


# Options that act on one kind of 4-bit base only: applied to, and in the lineage of, that base only.
_BASE_SPECIFIC = {"gptq_dequant_matmul": ("gptq", "qalora")}


def option_applies(hardware, key: str, base_method: str | None = None) -> bool:
    """The hardware option `key` is on and acts on this run (for base-specific options: on this base)."""
    from ptq_qlora.training import speed_option  # reads profiles and plain namespaces (benchmarks) alike

    return bool(speed_option(hardware, key)) and (key not in _BASE_SPECIFIC or base_method in _BASE_SPECIFIC[key])


def _arithmetic_options(cfg, step: str, base_method: str | None = None) -> dict:
    on = {key: True for key in _ARITHMETIC_OPTIONS[step] if option_applies(cfg.hardware, key, base_method)}
    if on.get("padding_free"):
        on["pack_length"] = cfg.hardware.pack_length
        from ptq_qlora.training import packed_attention_usable

        # a CPU profile trains packed rows with sdpa whatever it names (refused, warned): not in its lineage
        if cfg.hardware.get("packed_attention") and packed_attention_usable(cfg.hardware):
            on["packed_attention"] = cfg.hardware.packed_attention
    return {"arithmetic": on} if on else {}


def _training_context(cfg, step: str, base_method: str | None = None) -> dict:
    return {
        **_arithmetic_options(cfg, step, base_method),
        "seed": cfg.seed,
        "dtype": cfg.hardware.dtype,
        "train_dtype": cfg.hardware.train_dtype,
        # per-GPU batch x accumulation x GPUs (a two-GPU profile with half the accumulation of a
        # one-GPU one trains the same recipe, and shares its lineage)
        "effective_batch": cfg.hardware.train_batch_size * cfg.hardware.grad_accum
        * cfg.hardware.get("num_processes", 1) * cfg.hardware.get("num_machines", 1),
    }


def base_lineage(cfg, source: str | None = None) -> str:
    if source is not None:  # a given folder or Hub id
        return lineage_of(None, model=source)
    return lineage_of(None, model=cfg.model.source, revision=cfg.model.revision, extra=_plain(cfg.model.extra))


def sft_lineage(cfg, parent: str) -> str:
    return lineage_of(
        parent, stage="sft", train=train_settings(cfg, "sft"), **data_identity(cfg),
        prompt=prompt_identity(cfg), **_training_context(cfg, "sft"),
    )


def ptq_lineage(cfg, parent: str) -> str:
    # calibration samples come from the task's training split, so the data shapes it too
    quantizer = {k: v for k, v in _plain(cfg.quantizer).items() if k not in _QUANTIZER_LOADING_KEYS}
    return lineage_of(parent, stage="ptq", quantizer=quantizer, **data_identity(cfg), seed=cfg.seed)


def qlora_lineage(cfg, parent: str, base_method: str | None = None) -> str:
    """`base_method`: the quantizer method of the 4-bit base (its options that only act on it)."""
    from ptq_qlora.adapters.lora import ADAPTERS_CAST_BY_TRL

    # bfloat16 adapters over a base TRL leaves in float32 (GPTQ): another computation than before the
    # stage cast them, so another lineage; over bnb TRL always did, and the lineage stays
    adapters = {} if base_method in ADAPTERS_CAST_BY_TRL else {"adapter_dtype": "bfloat16"}
    return lineage_of(
        parent, stage="qlora", train=train_settings(cfg, "qlora"), **data_identity(cfg),
        prompt=prompt_identity(cfg), **_training_context(cfg, "qlora", base_method), **adapters,
    )


def eval_lineage(cfg, parent: str) -> str:
    return lineage_of(
        parent, stage="eval", **data_identity(cfg), prompt=prompt_identity(cfg),
        split=cfg.eval.split, max_new_tokens=cfg.eval.max_new_tokens, dtype=cfg.hardware.dtype,
        **_alignscore_identity(cfg),
    )


def _alignscore_identity(cfg) -> dict:
    """{"alignscore": which checkpoint (and backbone, if set)} when it scores, else nothing, so an
    unscored eval keeps the lineage it had before the option existed."""
    node = cfg.task.get("alignscore")
    if node is None or node.get("checkpoint") in (None, ""):
        return {}
    from ptq_qlora.metrics.alignscore import MODE, checkpoint_identity

    return {"alignscore": _set_values({"checkpoint": checkpoint_identity(node.checkpoint),
                                       "backbone": node.get("backbone"), "mode": MODE})}
