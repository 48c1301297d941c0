"""ptq-qlora: full SFT -> 4-bit PTQ -> QLoRA, evaluated at each point (Zhu et al., NAACL 2025)."""

__version__ = "0.1.0"
