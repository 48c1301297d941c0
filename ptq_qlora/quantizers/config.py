"""Schema of the `quantizer` config group (owned by ptq_qlora.quantizers).

One flat dataclass for every method: a method reads the fields it needs and ignores the rest, so a
Hydra override such as `quantizer.group_size=64` is type-checked at compose time whatever the method.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class QuantizerConfig:
    name: str = "none"  # config option: none | bnb-nf4 | gptq-4bit
    method: str = "none"  # registry key: none | bnb | gptq (ptq_qlora.quantizers.registry)
    label: str = "SFT-16bit"  # row name in reports, the paper's notation (PTQ-BNB-4bit, PTQ-GPTQ-4bit)
    bits: int = 16  # none: 16; bnb: 4; gptq: 2 | 3 | 4 | 8 (the paper uses 4)
    # After writing the checkpoint, reload it and require the same logits as the in-memory model.
    verify_reload: bool = True

    # --- bitsandbytes (method: bnb) ---
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # also quantize the per-block absmax constants (QLoRA's "double quantization")
    # bnb on AVX512-BF16 CPUs repacks weights for a fast bf16 inference kernel on the first eval
    # forward. Allowed for evaluation-only loads; never for training loads (see training_safety.py).
    cpu_packed_eval: bool = True

    # --- GPTQ (method: gptq, via gptqmodel) ---
    group_size: int = 128  # -1 = one group per row; else must divide every quantized layer's input width
    desc_act: bool = False  # act-order: quantize columns by decreasing activation magnitude
    # gptqmodel's own default is True (a post-2024 addition); False keeps plain GPTQ as the paper ran it.
    act_group_aware: bool = False
    sym: bool = True
    damp_percent: float = 0.01  # Hessian dampening (gptqmodel's name; its default is 0.05, AutoGPTQ's 0.01)
    calibration_samples: int = 128  # texts used (the caller draws them from the task's train split)
    min_calibration_samples: int = 16  # fewer usable samples than this is an error, before any work
    calibration_max_tokens: int = 512  # each sample is truncated to this many tokens
    calibration_min_tokens: int = 10  # shorter samples are dropped (gptqmodel drops them silently)
    calibration_batch_size: int = 1
    # gptqmodel's packing of finished layers: null = its default (block CPU pack); "gpu" packs on CUDA.
    # Same bytes either way (not in the lineage). Suspected cost of a 7B's GPTQ on a GPU (not measured).
    pack_impl: Optional[str] = None
    # gptqmodel kernel names (gptq_torch, gptq_torch_aten, auto, auto_trainable, ...). null = per device:
    # CPU eval -> gptq_torch_aten (fast int4 matmul), CPU train -> gptq_torch; CUDA -> auto / auto_trainable.
    backend_eval: Optional[str] = None
    backend_train: Optional[str] = None
