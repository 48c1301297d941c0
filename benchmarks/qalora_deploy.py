"""Deploying QA-LoRA merged vs PTQ-QLoRA on one GPU: generation tok/s and memory, batch 1 and 8.

One Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, vocab 32000; `--layers` of
them) with random 4-bit GPTQ codes (group 128, sym, desc_act=false), random fp16 scales, random bf16
embeddings/norms/head, written twice to disk:

* `gptq/`: a GPTQ checkpoint (gptqmodel's v1 layout), loaded with the project's GPTQ loader on
  gptqmodel's Triton kernel (`gptq_triton`; `auto` probes a Machete JIT build that fails offline);
* `merged/`: the same codes with a random rank-16 QA-LoRA adapter folded into float zero points,
  written by the project's merge writer (`hqq_layer` + `save_hqq`) and loaded with hqq's own loader.

Rows (all bf16, HF `generate`, greedy, eager, KV cache, `--prompt` random tokens, `--new` tokens), in this order;
the optional ones are skipped once `--budget` seconds have passed:
  QA-LoRA-merged (int4 tinygemm)    the merged HQQ codes/scales/float zeros on torch's int4 tinygemm op
                                    (`aten._weight_int4pack_mm`, torchao's int4 weight-only kernel); the
                                    conversion is exact: same codes, zero_t = (8 - zero) * scale. hqq 0.2.8's
                                    own torchao_int4 backend cannot be used on torch >= 2.10: it reads
                                    torch.__version__[:3] ("2.1") and packs int32 where the op wants uint8.
  QA-LoRA-merged (hqq torch) (opt.) hqq's default HQQLinear: unpack + dequantize + matmul every call
  PTQ-GPTQ-4bit+QLoRA               GPTQ Triton kernel + an unmerged peft LoRA r16 on q,k,v,o,gate,up,down
                                    (float32 adapter weights, peft's default, as the project's load_adapter)
  PTQ-GPTQ-4bit            (opt.)   the same base, adapter disabled
  PTQ-GPTQ-4bit+QA-LoRA    (opt.)   the QA-LoRA adapter that was merged, unmerged (peft's QA-LoRA variant)
Checks: the merged model's logits against the unmerged GPTQ + QA-LoRA model (bf16, so ~1e-2 relative
is bf16 noise; the adapter's own effect is printed beside it), and tinygemm against hqq's dequantization.

    python benchmarks/qalora_deploy.py --layers 32 --dir /dev/shm/qalora --out qalora_deploy.json
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

R, ALPHA, GROUP = 16, 32, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def config_for(layers: int, small: bool):
    from transformers import LlamaConfig

    shape = dict(SHAPE, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=512) if small else SHAPE
    return LlamaConfig(**shape, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{k}": v for n in range(config.num_hidden_layers) for k, v in per_layer.items()}


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """8 4-bit values per int32 along `dim` (low bits first), GPTQ's layout for qweight (dim 0) and qzeros (dim 1)."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8) << (4 * torch.arange(8, device=v.device))
    words = v.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def qalora_constants(a: torch.Tensor, b: torch.Tensor, in_features: int) -> torch.Tensor:
    """peft's QA-LoRA convention (adapters/qalora.py group_constants): c = s * (in/g) / g * B @ A."""
    n = in_features // GROUP
    return (ALPHA / R) * n / GROUP * (b.double() @ a.double())


def make(dirs: Path, config, device: str, seed: int = 0) -> dict:
    """Write gptq/ and merged/ from one set of random codes; return the QA-LoRA factors and timings."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from ptq_qlora.quantizers.hqq import save_hqq
    from ptq_qlora.quantizers.qalora_merge import hqq_layer

    gen = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    plain = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
             "lm_head.weight": (config.vocab_size, config.hidden_size)}
    gptq, adapters = {}, {}
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    for name, shape in plain.items():
        gptq[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    for name, _ in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            gptq[name] = torch.ones(config.hidden_size, device=device, dtype=torch.bfloat16)
    for name, (out_f, in_f) in linear_shapes(config).items():
        n = in_f // GROUP
        q = torch.randint(0, 16, (out_f, in_f), generator=gen, device=device, dtype=torch.uint8)
        s = (torch.rand(out_f, n, generator=gen, device=device) * 0.004 + 0.004).half()  # weights ~ +-0.06
        a = torch.randn(R, n, generator=gen, device=device) * 0.3
        b = torch.randn(out_f, R, generator=gen, device=device) * 0.3 / R
        adapters[name] = (a.bfloat16().cpu(), b.bfloat16().cpu())
        c = qalora_constants(*adapters[name], in_f).to(device)
        zero = 8.0 - c / s.double()
        gptq[f"{name}.qweight"] = pack_int32(q.T, 0)
        gptq[f"{name}.qzeros"] = pack_int32(torch.full((n, out_f), 7, device=device), 1)  # v1: zero - 1
        gptq[f"{name}.scales"] = s.T.contiguous()
        gptq[f"{name}.g_idx"] = (torch.arange(in_f, device=device) // GROUP).to(torch.int32)
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent), child,
                hqq_layer(q, zero, s.double(), GROUP, 4, None, torch.bfloat16, device))
    for name, param in list(skeleton.named_parameters()):
        if param.is_meta:
            parent, _, child = name.rpartition(".")
            setattr(skeleton.get_submodule(parent), child, torch.nn.Parameter(gptq[name], requires_grad=False))
    made = time.perf_counter()

    (dirs / "gptq").mkdir(parents=True, exist_ok=True)
    config.quantization_config = {"bits": 4, "group_size": GROUP, "desc_act": False, "sym": True, "lm_head": False,
                                  "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
                                  "method": "gptq", "pack_dtype": "int32"}
    config.dtype = torch.bfloat16
    config.save_pretrained(str(dirs / "gptq"))
    save_file({k: v.cpu() for k, v in gptq.items()}, str(dirs / "gptq" / "model.safetensors"))
    del config.quantization_config
    skeleton.config = config
    save_hqq(skeleton, dirs / "merged", torch.bfloat16)
    return {"adapters": adapters, "make_seconds": round(made - start, 2),
            "write_seconds": round(time.perf_counter() - made, 2)}


class Int4TinyGemmLinear(torch.nn.Module):
    """An HQQ 4-bit axis-1 layer on torch's int4 tinygemm op: W = (q - 8) * scale + zero_t with the same
    codes q and zero_t = (8 - zero) * scale, i.e. exactly HQQ's (q - zero) * scale."""

    def __init__(self, layer):
        super().__init__()
        meta = layer.meta
        out_f, in_f = meta["shape"]
        self.group, self.out_features = meta["group_size"], out_f
        codes = layer.unpack(dtype=torch.uint8)[: out_f * in_f // self.group].reshape(out_f, in_f)
        scale = meta["scale"].float().reshape(out_f, -1)
        zero_t = (8.0 - meta["zero"].float().reshape(out_f, -1)) * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero_t], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))
        self.cuda_op = codes.is_cuda
        if self.cuda_op:
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
        else:
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 8))
        self.bias = layer.bias

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda_op else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x, self.weight_int4, self.group, self.scales_and_zeros).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def to_tinygemm(model) -> dict:
    """Swap every HQQLinear for its tinygemm twin; returns the HQQ layers by name (to swap back)."""
    from hqq.core.quantize import HQQLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int4TinyGemmLinear(layer))
    return layers


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generation_row(model, label: str, batch: int, args, device: str) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up (kernels, autotune)
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    row = {"model": label, "batch": batch, "new_tokens": new, "seconds": round(seconds, 3),
           "tok_per_s": round(batch * new / seconds, 1)}
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(row), flush=True)
    return row


def probe_logits(model, config, device) -> torch.Tensor:
    ids = torch.randint(3, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def resident_gib(device) -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--small", action="store_true", help="a 256-wide toy of the same structure (CPU dry run)")
    p.add_argument("--dir", default="/dev/shm/qalora")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; optional rows are skipped past it")
    p.add_argument("--no-sizes", action="store_true", help="skip reading both checkpoints back for their byte breakdown")
    p.add_argument("--out", default="qalora_deploy.json")
    args = p.parse_args()
    started = time.perf_counter()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    from peft import LoraConfig, get_peft_model

    from ptq_qlora.adapters.qalora import group_constants
    from ptq_qlora.quantizers import QuantizerConfig, get_method
    from ptq_qlora.quantizers.qalora_merge import checkpoint_breakdown

    config = config_for(args.layers, args.small)
    dirs = Path(args.dir)
    result = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "shape": {**config.to_dict()}, "args": vars(args), "rows": [], "skipped": []}
    made = make(dirs, config, device)
    adapters = made.pop("adapters")
    result.update(made)
    if not args.no_sizes:
        result["sizes"] = {"gptq": checkpoint_breakdown(dirs / "gptq"), "merged": checkpoint_breakdown(dirs / "merged")}
    print(json.dumps({"sizes": result.get("sizes"), **made}), flush=True)
    free(device)

    def rows(model, label, optional=False):
        limit = args.budget if optional else float("inf")  # optional rows give way to the essential ones
        for batch in args.batches:
            if time.perf_counter() - started > limit:
                result["skipped"].append(f"{label} batch {batch}")
                continue
            result["rows"].append({**generation_row(model, label, batch, args, device), "weights_gib": resident_gib(device)})
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    # merged QA-LoRA: hqq's loader; the same tensors on int4 tinygemm, then hqq's own dequantize + matmul
    qcfg = QuantizerConfig(name="qa-lora", method="hqq", bits=4, group_size=GROUP)
    merged = get_method("hqq").load(qcfg, dirs / "merged", torch.bfloat16, False, {"": device})
    hqq_logits = probe_logits(merged, config, device)
    originals = to_tinygemm(merged)
    tinygemm_logits = probe_logits(merged, config, device)
    checks = {"tinygemm_layers": len(originals), "tinygemm_vs_hqq_rel_logit_diff": rel(tinygemm_logits, hqq_logits)}
    result["checks"] = checks
    if device.startswith("cuda"):  # the HQQ layers wait on the CPU (hqq's .cpu() is a no-op; move their tensors)
        for layer in originals.values():
            layer.W_q.data = layer.W_q.data.cpu()
            layer.meta = {k: v.cpu() if torch.is_tensor(v) else v for k, v in layer.meta.items()}
        free(device)
    rows(merged, "QA-LoRA-merged (int4 tinygemm)")
    if time.perf_counter() - started < args.budget:
        for name, layer in originals.items():
            layer.W_q.data = layer.W_q.data.to(device)
            layer.meta = {k: v.to(device) if torch.is_tensor(v) else v for k, v in layer.meta.items()}
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer)
        free(device)
    rows(merged, "QA-LoRA-merged (hqq torch)", optional=True)
    del merged, originals
    free(device)

    # PTQ-QLoRA: the GPTQ base on gptqmodel's Triton kernel with an unmerged LoRA r16; the same base with
    # no adapter and with the QA-LoRA adapter that was merged (unmerged here) as references
    gcfg = QuantizerConfig(name="gptq-4bit", method="gptq", bits=4, group_size=GROUP,
                           backend_eval="gptq_triton" if device.startswith("cuda") else "gptq_torch")
    base = get_method("gptq").load(gcfg, dirs / "gptq", torch.bfloat16, False, {"": device})
    base.eval()
    ptq_logits = probe_logits(base, config, device)
    # peft keeps adapter weights in float32 (its default autocast), as the project's load_adapter does
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0), "qlora")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.01)  # B nonzero too, as after training
    model.eval()
    rows(model, "PTQ-GPTQ-4bit+QLoRA")
    with model.disable_adapter():
        rows(model, "PTQ-GPTQ-4bit", optional=True)
    model.add_adapter("qalora", LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                           use_qalora=True, qalora_group_size=GROUP))
    model.delete_adapter("qlora")
    worst = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in adapters:
                a, b = adapters[key]
                module.lora_A["qalora"].weight.copy_(a)
                module.lora_B["qalora"].weight.copy_(b)
                expected = qalora_constants(a, b, module.in_features)
                worst = max(worst, rel(group_constants(module, "qalora").float().cpu(), expected.float().cpu()))
    model.set_adapter("qalora")
    model.eval()
    unmerged_logits = probe_logits(model, config, device)
    checks.update({
        "qalora_constants_vs_peft_rel": worst,
        "merged_hqq_vs_unmerged_qalora_rel_logit_diff": rel(hqq_logits, unmerged_logits),
        "merged_tinygemm_vs_unmerged_qalora_rel_logit_diff": rel(tinygemm_logits, unmerged_logits),
        "adapter_effect_rel_logit_diff": rel(ptq_logits, unmerged_logits),  # what the merge must carry
    })
    print(json.dumps(checks), flush=True)
    rows(model, "PTQ-GPTQ-4bit+QA-LoRA (unmerged)", optional=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"done_seconds": result["seconds"], "skipped": result["skipped"]}), flush=True)


if __name__ == "__main__":
    main()
