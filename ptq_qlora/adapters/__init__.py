"""LoRA adapters over a frozen (4-bit) base: attach for QLoRA training, load unmerged for evaluation."""
from ptq_qlora.adapters.lora import (ADAPTERS_CAST_BY_TRL, adapters_in_bfloat16, attach_lora, dequantize_frozen_base,
                                     load_adapter, parameter_counts)

__all__ = ["ADAPTERS_CAST_BY_TRL", "adapters_in_bfloat16", "attach_lora", "dequantize_frozen_base", "load_adapter",
           "parameter_counts"]
