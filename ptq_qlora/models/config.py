"""Schema of the `model` config group (owned by ptq_qlora.models)."""
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    name: str = "???"
    # Hub id, local folder, "tiny-random" or "gguf-package" (see ptq_qlora.models.loading).
    source: str = "???"
    revision: Optional[str] = None
    family: str = "llama"
    # Use the tokenizer's chat template to render prompts; else `prompt_template`.
    chat_template: bool = False
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    trust_remote_code: bool = False
    # Extra knobs for special sources (tiny-random architecture, GGUF package/file).
    extra: dict = field(default_factory=dict)
