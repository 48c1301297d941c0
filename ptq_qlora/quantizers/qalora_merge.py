"""Fold a trained QA-LoRA adapter into its GPTQ base, writing an HQQ checkpoint: no 16-bit copy of
any weight, no re-quantization.

GPTQ (desc_act=false) dequantizes W[o, i] = s[o, j] * (q[o, i] - z[o, j]) with j = i // g and integer
z. QA-LoRA adds c[o, j] to every weight of the group (adapters/qalora.py), so

    W'[o, i] = s[o, j] * (q[o, i] - z'[o, j]),   z' = z - c / s,

same codes q, same scales s, a float zero z'. HQQ stores exactly that (W = (W_q - zero) * scale,
float zero, any of 2/3/4/8 bits). Its axis=1 grouping cuts the row-major [out, in] weight into rows
of g, so flat group k = o * (in / g) + j: the same groups as GPTQ's, laid out row by row.

`merge_qalora` proves the result on a probe batch: the merged model, built in float32, must give the
unmerged base+adapter logits (float32) within MERGE_TOLERANCE, else nothing is written.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ptq_qlora.quantizers.common import disk_bytes, weight_files

log = logging.getLogger(__name__)
MERGE_TOLERANCE = 1e-3  # max |logit diff| / max |logit|, float32 merged vs float32 unmerged (measured ~1e-7)
HQQ_PACKING = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}
ROWS_PER_WORD = {2: 4, 3: 10, 4: 2, 8: 1}  # HQQ packs this many group-rows into one stored row


def is_gptq_linear(module: torch.nn.Module) -> bool:
    return all(hasattr(module, k) for k in ("qweight", "qzeros", "scales", "g_idx", "bits"))


def gptq_codes(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q [out, in] int32, z [out, in/g] int32, s [out, in/g] float32, g) of a gptqmodel layer, checked
    against gptqmodel's own dequantization."""
    from gptqmodel.utils.model_dequant import unpack_cols, unpack_rows

    bits, in_features, out_features = module.bits, module.in_features, module.out_features
    if bits not in HQQ_PACKING:
        raise ValueError(f"QA-LoRA merge supports GPTQ bits {sorted(HQQ_PACKING)}, not {bits}")
    g = module.group_size if module.group_size > 0 else in_features
    g_idx = module.g_idx.detach().cpu().long()
    if not torch.equal(g_idx, torch.arange(in_features) // g):
        raise ValueError("QA-LoRA's merge needs desc_act=false (act-order permutes the groups): this GPTQ layer's "
                         "g_idx is not i // group_size")
    q = unpack_rows(module.qweight.detach().cpu(), bits)[:in_features, :out_features]  # [in, out]
    z = unpack_cols(module.qzeros.detach().cpu(), bits)[:, :out_features]  # [in/g, out]
    if module.qzero_format() == 1:  # gptqmodel's v1 encoding stores zero - 1
        z = z + 1
    s = module.scales.detach().cpu()  # [in/g, out], float16 as GPTQ stores them
    theirs = type(module).dequantize_weight(module).detach().cpu()
    ours = s[g_idx] * (q - z[g_idx]).to(s.dtype)  # gptqmodel's arithmetic, in the scales' dtype
    if not torch.equal(ours.to(theirs.dtype), theirs):
        raise RuntimeError(f"unpacked GPTQ codes do not reproduce gptqmodel's weights (max diff "
                           f"{(ours.float() - theirs.float()).abs().max().item():.3g}); unexpected packing format")
    return q.T.contiguous().int(), z.T.contiguous().int(), s.T.contiguous().float(), g


def hqq_layer(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g: int, bits: int, bias, dtype: torch.dtype,
              device: str = "cpu"):
    """An HQQLinear holding codes q [out, in] with per-(row, group) float zero and scale [out, in/g]."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

    out_features, in_features = q.shape
    rows = out_features * in_features // g
    if rows % ROWS_PER_WORD[bits] and bits != 3:
        raise ValueError(f"HQQ {bits}-bit packing needs a multiple of {ROWS_PER_WORD[bits]} groups, got {rows}")
    packing = HQQ_PACKING[bits]
    layer = HQQLinear(None, quant_config=BaseQuantizeConfig(nbits=bits, group_size=g, axis=1), compute_dtype=dtype,
                      device=device, initialize=False)
    state = {
        "W_q": Quantizer.pack[packing](q.reshape(rows, g)),
        "scale": scale.reshape(rows, 1).to(dtype), "zero": zero.reshape(rows, 1).to(dtype),
        "nbits": bits, "group_size": g, "shape": torch.Size([out_features, in_features]), "axis": 1,
        "packing": packing, "unpack_view_dtype": Quantizer.unpack_view_dtype[packing], "view_as_float": False,
        "quant_scale": False, "quant_zero": False, "compute_dtype": dtype, "channel_wise": True, "optimize": False,
        "round_zero": False, "stores_quant_config": True, "offload_meta": False,
    }
    if bias is not None:
        state["bias"] = bias.detach().to(dtype)
    layer.load_state_dict(state)
    return layer


def merged_codes(module: torch.nn.Module, constants: torch.Tensor | None) -> dict:
    """Codes, float64 zero and scale of GPTQ layer `module` with QA-LoRA constants c [out, in/g] folded in
    (None: no adapter on this layer, zero shift 0)."""
    q, z, s, g = gptq_codes(module)
    zero = z.double() - (constants.double().cpu() / s.double() if constants is not None else 0.0)
    return {"q": q, "zero": zero, "scale": s.double(), "g": g, "bits": module.bits,
            "bias": getattr(module, "bias", None)}


def fold_adapter(peft_model) -> tuple[torch.nn.Module, dict[str, dict]]:
    """(plain base model, {GPTQ layer name: merged codes}) from a QA-LoRA PeftModel, which is consumed."""
    from ptq_qlora.adapters.qalora import check_group_constants, group_constants, is_qalora, lora_modules

    constants = {}
    for name, module in lora_modules(peft_model):
        if not is_qalora(module):
            raise ValueError(f"{name} has a plain LoRA adapter; only QA-LoRA adapters fold into the zero points")
        c = group_constants(module)
        check_group_constants(module, c)
        constants[name.removeprefix("base_model.model.")] = c
    model = peft_model.unload()  # the adapter wrappers out, base layers back, nothing merged
    codes = {name: merged_codes(m, constants.pop(name, None)) for name, m in model.named_modules() if is_gptq_linear(m)}
    if constants:
        raise RuntimeError(f"adapters on non-GPTQ layers could not be folded: {sorted(constants)}")
    return model, codes


def install_hqq(model: torch.nn.Module, codes: dict[str, dict], dtype: torch.dtype) -> torch.nn.Module:
    """Put an HQQ layer (scale/zero in `dtype`) at every named layer and cast the other parameters."""
    for name, code in codes.items():
        parent, _, child = name.rpartition(".")
        layer = hqq_layer(code["q"], code["zero"], code["scale"], code["g"], code["bits"], code["bias"], dtype)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    for param in model.parameters():  # not model.to(): transformers refuses dtype casts of GPTQ models
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


def relative_logit_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def merge_qalora(qcfg, base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> dict:
    """Write base+adapter folded into an HQQ checkpoint in `out_dir` (scale/zero and other tensors in
    `dtype`); returns stats with the float32 proof and sizes. Runs on the CPU."""
    from ptq_qlora.adapters import load_adapter
    from ptq_qlora.quantizers.api import load_quantized, probe_input_ids
    from ptq_qlora.quantizers.hqq import _load as load_hqq
    from ptq_qlora.quantizers.hqq import save_hqq

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    start = time.perf_counter()
    unmerged = load_adapter(load_quantized(qcfg, base_dir, torch.float32, for_training=True, device_map="cpu"),
                            adapter_dir)  # exact kernel (dequantize + matmul)
    ids = probe_input_ids(unmerged.config.vocab_size)
    expected = logits(unmerged)
    model, codes = fold_adapter(unmerged)
    float32_diff = relative_logit_diff(logits(install_hqq(model, codes, torch.float32)), expected)
    if not float32_diff <= MERGE_TOLERANCE:
        raise RuntimeError(f"merged QA-LoRA model differs from base+adapter by {float32_diff:.3g} (relative, float32)")
    save_hqq(install_hqq(model, codes, dtype), out_dir, dtype)
    seconds = time.perf_counter() - start
    name = str(dtype).removeprefix("torch.")
    stats = {"format": "hqq", "bits": qcfg.bits, "group_size": qcfg.group_size, "dtype": name,
             "merge_seconds": round(seconds, 3),
             "float32_rel_logit_diff": float32_diff}  # the proof: merged vs unmerged, both float32
    # the checkpoint as written, against the float32 unmerged logits; in a 16-bit dtype next to the
    # unmerged model run in that dtype, which separates the dtype's own rounding from the merge's
    stats[f"merged_{name}_rel_logit_diff"] = relative_logit_diff(logits(load_hqq(qcfg, out_dir, dtype, False, "cpu")),
                                                                 expected)
    if dtype != torch.float32:
        base = load_quantized(qcfg, base_dir, dtype, for_training=True, device_map="cpu")
        stats[f"unmerged_{name}_rel_logit_diff"] = relative_logit_diff(logits(load_adapter(base, adapter_dir)), expected)
    stats.update(size_stats(base_dir, out_dir))
    log.info("QA-LoRA merged into %s: %s", out_dir, stats)
    return stats


GPTQ_ROLES = {"qweight": "codes", "qzeros": "group_meta", "scales": "group_meta", "g_idx": "group_meta"}
HQQ_ROLES = {"W_q": "codes", "scale": "group_meta", "zero": "group_meta"}


def checkpoint_breakdown(folder: Path) -> dict[str, int]:
    """Tensor bytes of a GPTQ (safetensors) or HQQ (qmodel.pt) checkpoint by role: `codes` (packed
    low-bit weights), `group_meta` (per-group scale/zero, GPTQ's g_idx), `other` (embeddings, norms,
    head); tied tensors count once. `file_bytes`: the weight files on disk (adds the container)."""
    from safetensors import safe_open

    from ptq_qlora.quantizers.hqq import WEIGHTS_FILE

    sizes = {"codes": 0, "group_meta": 0, "other": 0}
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).exists():
        seen = set()
        for tensors in torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True).values():
            for key, value in tensors.items():
                if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in seen:
                    seen.add(value.untyped_storage().data_ptr())
                    sizes[HQQ_ROLES.get(key, "other")] += value.untyped_storage().nbytes()
    else:
        for path in weight_files(folder):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    itemsize = torch.empty((), dtype=getattr(torch, _SAFETENSORS_DTYPES[t.get_dtype()])).element_size()
                    sizes[GPTQ_ROLES.get(key.rsplit(".", 1)[-1], "other")] += numel * itemsize
    sizes["file_bytes"] = disk_bytes(folder)
    return sizes


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I64": "int64",
                       "U8": "uint8", "I8": "int8", "I16": "int16", "F64": "float64", "BOOL": "bool"}


def size_stats(ptq_dir: Path, merged_dir: Path) -> dict:
    ptq, merged = checkpoint_breakdown(ptq_dir), checkpoint_breakdown(merged_dir)
    return {"ptq_disk_bytes": ptq["file_bytes"], "merged_disk_bytes": merged["file_bytes"],
            "merged_over_ptq": round(merged["file_bytes"] / ptq["file_bytes"], 4),
            "ptq_bytes_by_role": ptq, "merged_bytes_by_role": merged}
