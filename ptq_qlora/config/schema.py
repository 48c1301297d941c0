"""Structured configs: every group's YAML starts from one of these, so a misspelt key fails at
compose time. Registered in Hydra's ConfigStore as `<group>/<group>_schema`."""
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from ptq_qlora.data.config import DataConfig, TaskConfig
from ptq_qlora.models.config import ModelConfig
from ptq_qlora.quantizers.config import QuantizerConfig


@dataclass
class HardwareConfig:
    name: str = "???"
    device: str = "cpu"  # cpu | cuda
    # Compute dtype: inference of 16-bit models, 4-bit compute, and mixed-precision training
    # (autocast). T4 has no bf16, so its profile says float16.
    dtype: str = "bfloat16"
    # Weights held during full SFT (fp32 master weights under bf16/fp16 autocast where memory allows).
    train_dtype: str = "float32"
    train_batch_size: int = 8
    grad_accum: int = 1
    eval_batch_size: int = 16
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    dataloader_workers: int = 0
    torch_threads: Optional[int] = None  # None: torch's default
    # --- one-GPU training speed (ptq_qlora/training.py, measured in benchmarks/RESULTS.md); all off on CPU.
    padding_free: bool = False  # examples packed into rows of <= pack_length tokens, no pad, boundaries kept
    pack_length: int = 2048
    # attention of packed rows while training (None: attn_implementation); flex_attention skips the
    # masked blocks sdpa computes under a dense block-diagonal mask (GPU only: no flex backward on CPU)
    packed_attention: Optional[str] = None
    use_liger_kernel: bool = False  # Liger's Triton RMSNorm/SwiGLU/RoPE (needs `pip install .[gpu]`)
    activation_offload: bool = False  # checkpointed layer inputs in pinned host memory
    frozen_in_compute_dtype: bool = False  # QLoRA: frozen norms/embeddings/lm_head stay bf16 (no fp32 upcast)
    # QLoRA on CPU: the 4-bit base dequantized once for training (same values, no per-step unpacking)
    dequantize_frozen_base: bool = False
    # QLoRA over GPTQ on a GPU: the base dequantized in forward and again in backward, no 16-bit weight
    # kept for the backward (ptq_qlora/quantizers/gptq_frozen.py)
    gptq_dequant_matmul: bool = False
    # QLoRA: each LoRA layer's base matmul and rank-r update in one autograd function, the base weight
    # dequantized in forward and backward (ptq_qlora/adapters/fused_lora.py; not under FSDP)
    fused_lora: bool = False
    # fused_lora under activation_offload: the base weights dequantized while a layer is recomputed serve
    # that layer's backward (one dequantization fewer per layer and step; one layer's 16-bit weights more)
    keep_recomputed_weights: bool = False
    # AdamW as one fused CUDA kernel (transformers' adamw_torch_fused) when the step's optim is adamw_torch
    fused_optimizer: bool = False
    # the training loss is the model's own (with Liger: its fused linear cross-entropy) instead of TRL's fused
    # LM head, whose per-step entropy/accuracy metrics stall the GPU (ptq_qlora/sft_trainer.py; not under FSDP)
    model_loss: bool = False
    # the Trainer's per-step host syncs (token count, NaN filter of the logged loss) moved to the step's end, so
    # the host queues clipping and the optimizer step while the GPU still runs the backward (sft_trainer.py)
    deferred_step_syncs: bool = False
    # QLoRA, experimental (not measured yet, off in every profile): each decoder layer through torch.compile
    # around the fused LoRA functions (unsloth compiles its blocks); the first step pays the compilation
    compile_layers: bool = False
    # GPTQ calibration rows per forward: 1 on CPU; on a GPU, 1 makes a 7B's GPTQ overhead-bound
    # (12.5 s a layer on an H200, benchmarks/RESULTS.md)
    gptq_calibration_batch_size: int = 1
    # --- several GPUs (ptq_qlora/distributed.py). Used only when started by a launcher
    # (`torchrun --nproc_per_node N train.py ...` or `accelerate launch ...`); a plain
    # `python train.py` stays on one device. Batch sizes above are per GPU: the effective batch is
    # train_batch_size * grad_accum * num_processes * num_machines.
    num_processes: int = 1  # GPUs (processes) per machine the profile is written for
    num_machines: int = 1
    distributed: str = "none"  # full SFT: none | ddp | fsdp
    qlora_distributed: str = "ddp"  # LoRA over a frozen (4-bit) base: none | ddp | fsdp
    fsdp_version: int = 2  # FSDP2 (fully_shard); 1 is deprecated in transformers
    fsdp_sharding: str = "full_shard"  # full_shard | shard_grad_op (FSDP1 also hybrid_shard, ...)
    # Trainer checkpoints (resume): sharded, each rank writes its shard. The stage's final model is
    # always gathered into one normal HF folder.
    fsdp_state_dict_type: str = "SHARDED_STATE_DICT"
    fsdp_cpu_offload: bool = False  # parameters/optimizer state in host memory (slow; last resort)
    fsdp_cpu_ram_efficient_loading: bool = False  # rank 0's weights broadcast to the others
    fsdp_wrap_layers: Optional[list] = None  # None: the model's decoder layer (_no_split_modules)
    ddp_bucket_cap_mb: Optional[int] = None  # None: torch's default (25)


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (full SFT or QLoRA)."""

    lr: float = 2e-5
    scheduler: str = "cosine"
    epochs: float = 2.0
    max_steps: int = -1  # >0 overrides epochs (smoke runs)
    warmup: float = 0.03  # ratio of total steps when < 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 5
    save_steps: int = 50  # checkpoints a crash resumes from
    save_total_limit: int = 2
    # Batch rows of similar length (HF's LengthGroupedSampler): far less padding on mixed data.
    group_by_length: bool = True


@dataclass
class QLoRATrainConfig(TrainConfig):
    lr: float = 2e-4
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[list] = None  # None: the model's lora_target_modules


@dataclass
class EvalConfig:
    enabled: bool = True  # evaluate each model a job produces (the paper's three points)
    split: str = "test"
    max_new_tokens: Optional[int] = None  # None: the task's
    batch_size: Optional[int] = None  # None: the hardware profile's


@dataclass
class StageConfig:
    """What a job runs. The chain is fixed (base -> sft -> ptq -> qlora); a job runs it up to
    `target`, reusing every completed upstream stage of the same lineage, and evaluates the
    models named in `eval_points`. `lr`/`scheduler`/`epochs` are shortcuts for the step named by
    `trains` (they default to `${sft.lr}` or `${qlora.lr}`), so `-m stage.lr=...` sweeps it."""

    name: str = "???"
    target: Optional[str] = None  # sft | ptq | qlora | None (evaluate `input` only)
    eval_points: list = field(default_factory=list)  # of base | sft | ptq | qlora | input
    trains: Optional[str] = None  # sft | qlora | None
    lr: Optional[float] = None
    scheduler: Optional[str] = None
    epochs: Optional[float] = None
    # A stage run alone may start from this instead of its upstream stage: a run-store folder,
    # a model folder or a Hub id.
    input: Optional[str] = None
    # The no-SFT ablation: quantize the base model itself (base -> ptq -> qlora, no stage-1 SFT).
    skip_sft: bool = False


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "ptq-qlora"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online with a W&B key, else offline) | online | offline | disabled
    group: Optional[str] = None  # None: the job's SFT lineage (ptq_qlora/tracking.py)
    tags: list = field(default_factory=list)
    artifacts: str = "reference"  # stage folders as W&B artifacts: reference | upload | none


@dataclass
class PathsConfig:
    root: str = "???"
    data_dir: str = "???"
    store: str = "???"
    output_dir: str = "???"


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [
        ("model", ModelConfig),
        ("task", TaskConfig),
        ("data", DataConfig),
        ("quantizer", QuantizerConfig),
        ("hardware", HardwareConfig),
        ("stage", StageConfig),
        ("logger", LoggerConfig),
        ("paths", PathsConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


@dataclass
class RunConfig:
    """Top level: the groups plus the two training recipes every lineage depends on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    qlora: QLoRATrainConfig = field(default_factory=QLoRATrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 42
    force: bool = False  # redo stages even when a completed one with the same lineage exists
    experiment_name: str = "default"
