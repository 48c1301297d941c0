"""Post-training quantization: a registry of methods (none, bnb, gptq) behind one small API."""
from ptq_qlora.quantizers.api import load_quantized, quantize, quantize_with_model, validate
from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, get_method, method_names, register
from ptq_qlora.quantizers.training_safety import ensure_training_safe, training_hazards

__all__ = [
    "QuantizerConfig", "QuantMethod", "ensure_training_safe", "get_method", "load_quantized", "method_names",
    "quantize", "quantize_with_model", "register", "training_hazards", "validate",
]
