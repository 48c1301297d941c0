"""`gptq`: GPTQ through gptqmodel; the checkpoint loads in transformers (+ optimum) with a named kernel.

CPU kernels (gptqmodel 7.6, measured in tests): `gptq_torch_aten` (TorchAtenLinear, int4pack matmul in
bf16) is fast for inference but drops gradients once it has run an inference forward;
`gptq_torch` (TorchLinear, dequantize + matmul in the model dtype) is exact and trains. See
training_safety.py.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from ptq_qlora.quantizers.config import QuantizerConfig
from ptq_qlora.quantizers.registry import QuantMethod, register
from ptq_qlora.quantizers.training_safety import training_hazards

log = logging.getLogger(__name__)

GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # gptqmodel's accepted values
CPU_BACKENDS = {"eval": "gptq_torch_aten", "train": "gptq_torch"}
CUDA_BACKENDS = {"eval": "auto", "train": "auto_trainable"}
CUDA_EVAL_FALLBACK = "gptq_triton"  # when `auto`'s kernel cannot be built here (see _load)


def import_gptqmodel():
    """Import gptqmodel with a worker count it accepts: its default, (cores + 1) // 2, gives 1 on a
    2-core machine, and its model-loader pool needs 2 ("requests 2 workers but parent 'cpu' only has 1")."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and ((os.cpu_count() or 1) + 1) // 2 < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    if "gptqmodel" not in sys.modules:
        _import_in_own_thread("gptqmodel")
    import gptqmodel

    return gptqmodel


def _import_in_own_thread(name: str) -> None:
    """gptqmodel's import leaves its module frame referenced for good, and through the frames' f_back
    chain every caller's frame with its locals: a model loaded by the function that first imported it
    (a GPTQ eval load, say) was never freed (seen on CPU and on an H200). Importing in a short-lived
    thread gives that chain the thread's frames, not ours."""
    failure = []

    def run():
        try:
            importlib.import_module(name)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name=f"import-{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def resolve_backend(qcfg: QuantizerConfig, for_training: bool, device: str) -> str:
    chosen = qcfg.backend_train if for_training else qcfg.backend_eval
    if chosen:
        return chosen
    if device.startswith("cuda"):
        return CUDA_BACKENDS["train" if for_training else "eval"]
    if for_training or qcfg.bits != 4 or qcfg.group_size not in (16, 32, 64, 128):
        return CPU_BACKENDS["train"]  # TorchAten only takes 4-bit, group size 16..128
    return CPU_BACKENDS["eval"]


def backend_kernel(name: str):
    """gptqmodel's GPTQ kernel class for a backend name; None for the `auto*` selectors."""
    from gptqmodel import BACKEND
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import get_kernel_for_backend

    try:
        backend = BACKEND(name)
    except ValueError:
        raise ValueError(f"unknown GPTQ backend {name!r}; e.g. gptq_torch, gptq_torch_aten, auto, "
                         "auto_trainable") from None
    if backend in (BACKEND.AUTO, BACKEND.AUTO_TRAINABLE):
        return None
    return get_kernel_for_backend(backend, METHOD.GPTQ, FORMAT.GPTQ)


def check_backends(qcfg: QuantizerConfig, device: str) -> None:
    """The evaluation and training kernels this job will load must take the bit width and group
    size (e.g. TorchAten is 4-bit only): say so now rather than after quantizing, deep in a load."""
    for key, for_training in (("backend_eval", False), ("backend_train", True)):
        name = resolve_backend(qcfg, for_training, device)
        kernel = backend_kernel(name)
        if kernel is None:
            continue
        for what, value, supported in (("bits", qcfg.bits, kernel.SUPPORTS_BITS),
                                       ("group_size", qcfg.group_size, kernel.SUPPORTS_GROUP_SIZE)):
            if value not in supported:
                raise ValueError(f"GPTQ {key}={name} ({kernel.__name__}) supports {what} {list(supported)}, not "
                                 f"{value}; choose another quantizer.{key} (null picks one that fits on {device})")


def quantized_linear_widths(src_dir: Path) -> dict[str, int]:
    """Input width of every nn.Linear GPTQ will quantize (all but the output head), from config only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def calibration_examples(qcfg: QuantizerConfig, tokenizer, texts: list[str]) -> list[dict]:
    """Tokenized samples gptqmodel will actually use: truncated, too-short ones dropped, first N kept."""
    if tokenizer is None:
        raise ValueError("GPTQ needs a tokenizer to tokenize its calibration texts")
    examples = []
    for text in texts:
        # texts come rendered (BOS included where the model wants one): add no special tokens
        ids = tokenizer(text, truncation=True, max_length=qcfg.calibration_max_tokens,
                        add_special_tokens=False)["input_ids"]
        if len(ids) > qcfg.calibration_min_tokens:  # gptqmodel drops len <= min_length
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(examples) == qcfg.calibration_samples:
            break
    return examples


def _validate(qcfg: QuantizerConfig, src_dir: Path, tokenizer, calibration_texts: list[str]) -> None:
    import_gptqmodel()  # here rather than in _quantize: its ~7 s import is not quantization time
    if qcfg.group_size not in GROUP_SIZES:
        raise ValueError(f"GPTQ group_size {qcfg.group_size} is not supported; choose one of {GROUP_SIZES}")
    if qcfg.group_size != -1:
        for name, width in quantized_linear_widths(src_dir).items():
            if width % qcfg.group_size:
                raise ValueError(f"GPTQ group_size {qcfg.group_size} does not divide layer {name} input width {width}")
    if not 0 < qcfg.damp_percent < 1:
        raise ValueError(f"GPTQ damp_percent must be in (0, 1), got {qcfg.damp_percent}")
    if qcfg.desc_act and qcfg.act_group_aware:
        raise ValueError("GPTQ desc_act and act_group_aware are mutually exclusive (gptqmodel refuses both)")
    check_backends(qcfg, "cuda:0" if torch.cuda.is_available() else "cpu")
    usable = len(calibration_examples(qcfg, tokenizer, calibration_texts))
    if usable < qcfg.min_calibration_samples:
        raise ValueError(
            f"GPTQ needs at least {qcfg.min_calibration_samples} calibration samples longer than "
            f"{qcfg.calibration_min_tokens} tokens; got {usable} from {len(calibration_texts)} texts"
        )


def drop_torch_compile(model: torch.nn.Module) -> None:
    """TorchLinear wraps its dequantizer in torch.compile at load time. On CPU the first forward then
    spends ~25 s building C++ kernels (even for a 2-layer toy) for no training benefit. And a model
    whose compiled dequantizer has run is never freed (torch.compile's cache keeps it: on this CPU with
    the wrapper kept, a dropped model stays alive; on an H200 each GPTQ 7B left 3.8-4.1 GiB allocated,
    benchmarks/RESULTS.md). Removing the instance attribute before any call falls back to the plain
    method; the training paths dequantize through their own functions (gptq_frozen, fused_lora)."""
    for module in model.modules():
        if "dequantize_weight" in vars(module):
            del module.dequantize_weight


def fused_block_update_ready(device: str) -> bool:
    """Whether gptqmodel's fused CUDA kernel for GPTQ's 128-column blocks can run (it is built from
    source with nvcc on first use, then cached). Without it gptqmodel falls back to a Python loop over
    every column, 2-4x slower on a GPU (the stage on 7B layers: 12.1 vs 2.9 s each, benchmarks/RESULTS.md): say so
    before the long run rather than after. On CPU gptqmodel always takes that loop."""
    if not device.startswith("cuda"):
        return False
    from gptqmodel.quantization import gptq_cuda

    log.info("GPTQ: loading gptqmodel's fused CUDA block update (built with nvcc the first time, then cached)")
    if gptq_cuda.block_update_available():
        return True
    reason = getattr(getattr(gptq_cuda, "_EXTENSION", None), "_last_error", "") or "unknown reason"
    log.warning("GPTQ: gptqmodel's fused CUDA block update is unavailable (%s); quantization falls back to "
                "its per-column Python loop, 2-4x slower. It needs nvcc (the CUDA toolkit) and ninja.", reason)
    return False


def _quantize(qcfg, src_dir: Path, out_dir: Path, tokenizer, calibration_texts, compute_dtype):
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    fused_block_update_ready(device)
    quant_config = QuantizeConfig(
        bits=qcfg.bits, group_size=qcfg.group_size, desc_act=qcfg.desc_act, sym=qcfg.sym,
        damp_percent=qcfg.damp_percent, act_group_aware=qcfg.act_group_aware,
        # gptqmodel's default offloads finished layers to a temp folder and leaves meta tensors behind,
        # so the in-memory result could not be run or compared with the saved checkpoint.
        offload_to_disk=False,
        **({"pack_impl": qcfg.pack_impl} if qcfg.pack_impl else {}),
    )
    # dtype: gptqmodel's "auto" picks bf16 on CPU and would store embeddings/norms/lm_head in bf16
    # even for an fp32 source; follow the caller's compute dtype instead.
    model = GPTQModel.load(str(src_dir), quant_config, device=device, dtype=compute_dtype)
    # Name the kernel the in-memory result uses: `auto` may pick a JIT/downloaded kernel on CPU.
    model.quantize(
        calibration_examples(qcfg, tokenizer, calibration_texts),
        batch_size=qcfg.calibration_batch_size,
        tokenizer=tokenizer,
        backend=BACKEND(resolve_backend(qcfg, True, device)),
        calibration_data_min_length=qcfg.calibration_min_tokens,
    )
    model.save(str(out_dir))
    hf_model = model.model
    _zeros_to_kernel_format(hf_model)
    if device == "cpu":
        drop_torch_compile(hf_model)
    return hf_model


def _zeros_to_kernel_format(model: torch.nn.Module) -> None:
    """After quantize(), gptqmodel leaves qzeros in the v1 (checkpoint) encoding while its kernels
    expect v2 (zero-point + 1), so the in-memory model computes with every zero point off by one
    (logits differ from the reloaded checkpoint by ~0.7 on the tiny model). Loading converts; do the
    same here, after saving, so the in-memory model is the one the checkpoint describes."""
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "REQUIRES_FORMAT_V2", False) and module.qzero_format() == 1:
                convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)


def _load(qcfg: QuantizerConfig, path: Path, compute_dtype: torch.dtype, for_training: bool, device_map):
    import_gptqmodel()
    from transformers import AutoModelForCausalLM, GPTQConfig

    device = str(next(iter(device_map.values()))) if isinstance(device_map, dict) else str(device_map or "cpu")
    backend = resolve_backend(qcfg, for_training, device)

    def load_with(name: str):
        # Only loading attributes (backend) of this config are used, the rest comes from config.json;
        # transformers warns about exactly that, which is what we want.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=compute_dtype, device_map=device_map,
                quantization_config=GPTQConfig(bits=qcfg.bits, backend=name),
            )

    model = None
    try:
        model = load_with(backend)
    except Exception as error:  # noqa: BLE001 - only the default `auto` choice falls back, named backends raise
        if backend != CUDA_BACKENDS["eval"] or for_training or qcfg.backend_eval:
            raise
        # `auto` on a Hopper GPU picks Machete, whose first use builds CUTLASS kernels it downloads first:
        # offline (or without nvcc) that fails inside the load. Triton's kernel needs neither.
        log.warning("GPTQ: loading with gptqmodel's `auto` kernel failed (%s: %s); loading with %s instead "
                    "(set quantizer.backend_eval to choose)", type(error).__name__, error, CUDA_EVAL_FALLBACK)
    if model is None:  # outside the handler: its traceback would keep the failed load's tensors alive meanwhile
        model = load_with(CUDA_EVAL_FALLBACK)
    if device == "cpu" or for_training:  # on a GPU, eval keeps it: its Triton kernels never call it
        drop_torch_compile(model)
    if for_training and training_hazards(model):
        raise ValueError(f"GPTQ backend {backend!r} is not safe for training: {training_hazards(model)[0]}")
    return model


def _describe(qcfg: QuantizerConfig) -> dict:
    return {"group_size": qcfg.group_size, "desc_act": qcfg.desc_act, "act_group_aware": qcfg.act_group_aware,
            "sym": qcfg.sym, "damp_percent": qcfg.damp_percent, "calibration_samples": qcfg.calibration_samples,
            "calibration_max_tokens": qcfg.calibration_max_tokens}


register(QuantMethod(name="gptq", supported_bits=(2, 3, 4, 8), validate=_validate, quantize=_quantize,
                     load=_load, needs_calibration=True, describe=_describe))
