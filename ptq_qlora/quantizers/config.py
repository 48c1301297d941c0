"""Schema of the `quantizer` config group (owned by ptq_qlora.quantizers)."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class QuantizerConfig:
    name: str = "none"  # none | bnb-nf4 | gptq-4bit
    method: str = "none"  # registry key: none | bnb | gptq
    bits: int = 16
    extra: dict = field(default_factory=dict)
