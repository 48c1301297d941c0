"""One-GPU QLoRA speed: the project's QLoRA stage code path against stock HF (transformers + peft +
bitsandbytes) and HF + Liger, on the same random 7B-shaped NF4 checkpoint and the same batches; the
padded vs padding-free path on real-data lengths; the eval stage's batched generation vs HF generate
at batch 1; optionally full SFT of a ~1B shape. One process runs the modes one after another (each
loads its own model; modes that apply Liger go last, since Liger patches transformers' modules).

    python benchmarks/qlora_speed.py lengths --out .site-speed/lengths.json          # here, CPU: real data
    python benchmarks/qlora_speed.py make --dir /dev/shm/llama2 --arch llama2          # GPU: bf16 -> NF4
    python benchmarks/qlora_speed.py run --dir /dev/shm/llama2 --arch llama2 --lengths .site-speed/lengths.json \\
        --modes hf,project_before,real_before,gen,project,real,liger --out results.jsonl
    python benchmarks/qlora_speed.py table results.jsonl

Modes (LoRA r16, alpha 32, dropout 0 on q,k,v,o,gate,up,down; AdamW; bf16 compute):
- hf: stock HF as ../shared/gpu-baselines/qlora_peers.py does it: the NF4 checkpoint through
  `from_pretrained`, `prepare_model_for_kbit_training` (checkpointing), `get_peft_model`, a plain loop
  over rows of `--seq` tokens (labels = inputs).   liger: the same after `apply_liger_kernel_to_<arch>`.
- project_before / project: the QLoRA stage's code: `load_quantized(..., for_training=True)`,
  `attach_lora`, `ptq_qlora.training.train_tokenized` (TRL SFTTrainer, completion-only loss) with the
  h200 profile's speed options off / as the profile sets them (padding_free, use_liger_kernel,
  frozen_in_compute_dtype). project_offload: the profile plus activation_offload. Same rows as hf.
- real_before / real: the same two on rows with the prompt/completion lengths of the real training mix
  (`lengths`: DialogSum + general-instruction rows, rendered and tokenized as the stage does), random
  token ids; effective tok/s counts non-pad tokens only.
- gen: the eval stage's `generate_batched` (profile eval_batch_size) vs `model.generate` one prompt
  at a time, same prompts (real DialogSum prompt lengths), greedy, `--new-tokens` each.
- sft1b: full SFT (bf16 weights, the profile's options) of a TinyLlama-1.1B shape on the real lengths.
- GPTQ base (`make --gptq` quantizes the same bf16 model with the project's GPTQ quantizer, timed):
  hf_gptq (stock peft LoRA over gptqmodel's trainable kernel), project_gptq (the stage's path with the
  h200 profile: hardware.gptq_dequant_matmul), project_gptq_plain (the same with it off), gptq_check
  (its dequantization and LoRA gradients against the stock kernel).
- memory_nf4 / memory_gptq: what is live at the step's memory peak, by the line that allocated it
  (benchmarks/memory_trace.py), over each base.

Timing: CUDA-synchronised clock at each optimizer step's end; fixed shape: median of steps 3..N;
real data: non-pad tokens of steps 3..N over their time. Peak memory: torch.cuda.max_memory_allocated
over the mode (reset at its start; what an earlier mode left allocated is reported as `resident_gib`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNSLOTH_H100 = 11_451  # tok/s, ../shared/gpu-baselines/RESULTS.md (H100 80GB, same shape and batch), 6.09 GiB
ARCHS = {  # the real widths; --layers may cut depth
    "llama2": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                   num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32)),
    "qwen2": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                  num_key_value_heads=4, vocab_size=152064, num_hidden_layers=28)),
    "mistral": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=32768, num_hidden_layers=32)),
    "tiny": ("LlamaConfig", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,  # CPU smoke runs
                                 num_key_value_heads=4, vocab_size=1024, num_hidden_layers=2)),
    "tinyllama": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                                      num_key_value_heads=4, vocab_size=32000, num_hidden_layers=22)),
}
FIRST_ID = 3  # ids 0..2 are <unk>/<s>/</s>: random rows never contain the pad id, so non-pad counts are exact


def emit(out: Path | None, **record) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def qcfg(method: str = "bnb"):
    """conf/quantizer/bnb-nf4.yaml or gptq-4bit.yaml's settings (no reload check: timing only)."""
    from ptq_qlora.quantizers import QuantizerConfig

    if method == "gptq":
        return QuantizerConfig(name="gptq-4bit", method="gptq", label="PTQ-GPTQ-4bit", bits=4, group_size=128,
                               desc_act=False, act_group_aware=False, sym=True, damp_percent=0.01,
                               calibration_samples=128, verify_reload=False,
                               # CALIB_TOKENS: the baseline script's 2048 for a like-for-like time (stage: 512)
                               calibration_max_tokens=int(os.environ.get("CALIB_TOKENS") or 512),
                               calibration_batch_size=8,  # the GPU profiles' gptq_calibration_batch_size
                               pack_impl=os.environ.get("PACK_IMPL") or None)  # gptqmodel's packing (gpu: CUDA)
    return QuantizerConfig(name="bnb-nf4", method="bnb", label="PTQ-BNB-4bit", bits=4, quant_type="nf4",
                           double_quant=True, verify_reload=False)


def random_texts(n: int, words: int, vocab: int, seed: int = 0) -> list[str]:
    """Calibration texts for the word tokenizer: `words` random tokens each."""
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{i}" for i in torch.randint(FIRST_ID, vocab, (words,), generator=gen).tolist()) for _ in range(n)]


def word_tokenizer(vocab: int):
    """t<i> -> id i: any id sequence round-trips as text (the random model needs no real tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(FIRST_ID, vocab)}}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def arch_config(arch: str, layers: int | None):
    import transformers

    cls, widths = ARCHS[arch]
    widths = {**widths, **({"num_hidden_layers": layers} if layers else {})}
    return getattr(transformers, cls)(**widths, max_position_embeddings=4096, tie_word_embeddings=False,
                                      use_cache=False)


# --- make: random bf16 checkpoint -> the project's bnb quantizer ------------------------------------------

def make(args) -> None:
    from transformers import AutoModelForCausalLM

    from ptq_qlora.quantizers import quantize

    src, dst = Path(args.dir) / "bf16", Path(args.dir) / "nf4"
    config = arch_config(args.arch, args.layers)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda:0" if CUDA else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(src))
    word_tokenizer(config.vocab_size).save_pretrained(str(src))
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    stats = quantize(qcfg(), src, dst, tokenizer=None, calibration_texts=[], compute_dtype="bfloat16")
    emit(Path(args.out) if args.out else None, what="make", arch=args.arch, layers=config.num_hidden_layers,
         params=params, build_and_save_s=round(build_s, 1), **stats)
    if args.gptq_random:  # QLoRA over GPTQ without paying for GPTQ: random 4-bit codes in its layout
        t0 = time.perf_counter()
        random_gptq_checkpoint(config, Path(args.dir) / "gptq", "cuda:0" if CUDA else "cpu")
        emit(Path(args.out) if args.out else None, what="make_gptq_random", arch=args.arch,
             seconds=round(time.perf_counter() - t0, 1))
    if args.gptq:  # item (c): the PTQ stage's GPTQ quantizer on the whole model, its default settings
        memory_start()
        texts = random_texts(128, int(os.environ.get("CALIB_TOKENS") or 512) + 88, min(config.vocab_size, 32000))
        stats = quantize(qcfg("gptq"), src, Path(args.dir) / "gptq", word_tokenizer(32000), texts, "bfloat16")
        emit(Path(args.out) if args.out else None, what="make_gptq", arch=args.arch, layers=config.num_hidden_layers,
             pack_impl=os.environ.get("PACK_IMPL") or "default", fused_block_update=gptq_block_update_loaded(),
             per_layer_s=round(stats["quantize_seconds"] / config.num_hidden_layers, 2), peak_gib=peak_gib(), **stats)
    if not args.keep_bf16:
        import shutil

        shutil.rmtree(src)


def gptq_block_update_loaded() -> bool:
    """Whether gptqmodel's fused CUDA block kernel ran (without it: a per-column Python loop, ~3x slower)."""
    from gptqmodel.quantization import gptq_cuda

    return bool(CUDA and gptq_cuda.block_update_available())


def random_gptq_checkpoint(config, out_dir: Path, device: str, group: int = 128) -> None:
    """A GPTQ checkpoint (gptqmodel v1 layout, 4 bits, group 128, sym, no act-order) with random codes
    and scales for every decoder linear, random bf16 embeddings/head, unit norms (qalora_deploy.py's
    writer, for any of ARCHS' Llama-style shapes)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from qalora_deploy import pack_int32

    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {}
    for name, param in skeleton.named_parameters():
        module = skeleton.get_submodule(name.rpartition(".")[0])
        if isinstance(module, torch.nn.Linear) and name != "lm_head.weight":
            if name.endswith(".bias"):
                tensors[name] = torch.zeros(param.shape, dtype=torch.bfloat16)
                continue
            out_f, in_f = param.shape
            base, n = name.removesuffix(".weight"), in_f // group
            codes = torch.randint(0, 16, (in_f, out_f), generator=gen, device=device, dtype=torch.uint8)
            tensors[f"{base}.qweight"] = pack_int32(codes, 0).cpu()
            tensors[f"{base}.qzeros"] = pack_int32(torch.full((n, out_f), 7, device=device), 1).cpu()  # v1: 8 - 1
            tensors[f"{base}.scales"] = (torch.rand(n, out_f, generator=gen, device=device) * 0.004 + 0.004).half().cpu()
            tensors[f"{base}.g_idx"] = (torch.arange(in_f) // group).to(torch.int32)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.quantization_config = {"bits": 4, "group_size": group, "desc_act": False, "sym": True, "lm_head": False,
                                  "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
                                  "method": "gptq", "pack_dtype": "int32"}
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out_dir))
    del config.quantization_config
    save_file(tensors, str(out_dir / "model.safetensors"))
    word_tokenizer(config.vocab_size).save_pretrained(str(out_dir))


# --- lengths: the real training mix, tokenized as the stage does ------------------------------------------

def lengths(args) -> None:
    """Prompt/completion token counts of the QLoRA stage's training rows (task + general mix, paper
    sizes), rendered with the model config's template and tokenized by `tokenize_for_training`."""
    from hydra import compose, initialize_config_dir

    from ptq_qlora.config import CONF_DIR, setup
    from ptq_qlora.data import load_task_data
    from ptq_qlora.models.loading import load_tokenizer, materialize_source
    from ptq_qlora.training import tokenize_for_training

    setup()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={args.model}", f"task={args.task}",
                                                       f"data={args.data}", f"paths.data_dir={args.data_dir}"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tok_cfg = compose(config_name="config", overrides=[f"model={args.tokenizer_model}"]).model
    tokenizer = load_tokenizer(materialize_source(tok_cfg))
    data = load_task_data(cfg.task, cfg.data, tokenizer=tokenizer)
    train = data.train
    if args.max_rows and len(train) > args.max_rows:
        train = train.shuffle(seed=0).select(range(args.max_rows))
    sources = train["source"]
    encoded = tokenize_for_training(train, tokenizer, cfg.model)
    rows = [[len(m) - sum(m), sum(m), s] for m, s in zip(encoded["completion_mask"], sources)]
    record = {"what": "lengths", "task": args.task, "data": args.data, "template_of": args.model,
              "tokenizer": f"{args.tokenizer_model} ({type(tokenizer).__name__}, vocab {len(tokenizer)})",
              "rows": len(rows), "sources": {s: sources.count(s) for s in sorted(set(sources))},
              "mean_tokens": sum(p + c for p, c, _ in rows) / len(rows),
              "max_tokens": max(p + c for p, c, _ in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**record, "prompt_completion_source": rows}))
    print(json.dumps(record))


def real_rows(path: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    """`n` rows drawn (seeded) from the real length distribution, random ids, completion mask as the stage's."""
    import random

    spec = json.loads(Path(path).read_text())["prompt_completion_source"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, completion, _ in rng.sample(spec, min(n, len(spec))):
        ids = torch.randint(FIRST_ID, vocab, (prompt + completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion, "length": len(ids)})
    return rows


def fixed_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(FIRST_ID, vocab, (seq,), generator=gen).tolist(),
             "completion_mask": [1] * seq, "length": seq} for _ in range(n)]


# --- the modes ---------------------------------------------------------------------------------------------

def profile(name: str, overrides: dict) -> SimpleNamespace:
    from fsdp_sft import load_profile

    hw = load_profile(name)
    # one micro-batch per optimizer step, as the stock-HF loop: step times compare directly
    hw.update({"dataloader_workers": 0, "num_processes": 1, "grad_accum": 1} | overrides)
    if not CUDA:
        hw.update(device="cpu", dtype="float32", use_liger_kernel=False, packed_attention=None)
    return SimpleNamespace(**hw)


SPEED_OFF = dict(padding_free=False, use_liger_kernel=False, frozen_in_compute_dtype=False, activation_offload=False,
                 packed_attention=None, fused_lora=False)


def memory_start() -> float:
    gc.collect()
    if not CUDA:
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


class StepClock:
    """A TrainerCallback-like clock: (time, tokens seen) at each optimizer step's end."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def mark(self, tokens: int) -> None:
        sync()
        self.marks.append((time.perf_counter(), tokens))

    def summary(self, skip: int = 2) -> dict:
        # marks[0] is taken before step 1, marks[i] at the end of step i: times[i-1] is step i
        times = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
        kept = self.marks[skip:]  # from the end of step `skip`: steps skip+1..N are timed
        tokens = kept[-1][1] - kept[0][1]
        seconds = kept[-1][0] - kept[0][0]
        return {"step_times_s": [round(t, 4) for t in times], "median_step_s": statistics.median(times[skip:]),
                "timed_tokens": tokens, "timed_seconds": seconds, "tok_s": tokens / seconds}


def trainer_clock():
    from transformers import TrainerCallback

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.mark(int(state.num_input_tokens_seen))

    return clock, Clock()


def run_hf(args, liger: bool, base: str = "nf4") -> dict:
    """Stock HF QLoRA (qlora_peers.py's recipe) over the same NF4 (or GPTQ: peft's GPTQ LoRA layer over
    gptqmodel's trainable kernel, ../shared/gpu-baselines/lora_bnb_vs_gptq.py) checkpoint."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, GPTQConfig

    if liger:
        import liger_kernel.transformers as lk

        getattr(lk, f"apply_liger_kernel_to_{ {'llama2': 'llama', 'tinyllama': 'llama'}.get(args.arch, args.arch) }")()
    resident = memory_start()
    extra = {"quantization_config": GPTQConfig(bits=4, backend="auto_trainable")} if base == "gptq" else {}
    model = AutoModelForCausalLM.from_pretrained(str(Path(args.dir) / base), dtype=torch.bfloat16,
                                                 device_map={"": 0} if CUDA else None, attn_implementation="sdpa",
                                                 **extra)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    result = {**plain_training_loop(model, args, model.device), "peak_gib": peak_gib(), "resident_gib": resident}
    del model
    return result


def plain_training_loop(model, args, device) -> dict:
    """The peers' loop (stock HF, unsloth): AdamW lr 1e-4 over `args.steps` batches of fixed_rows, each
    step clocked; returns the clock's summary and the step losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = fixed_rows(args.batch * args.steps, args.seq, model.config.vocab_size)
    clock = StepClock()
    clock.mark(0)
    seen, losses = 0, []
    for step in range(args.steps):
        batch = rows[step * args.batch:(step + 1) * args.batch]
        x = torch.tensor([r["input_ids"] for r in batch], device=device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += x.numel()
        losses.append(round(loss.item(), 4))
        clock.mark(seen)
    return {**clock.summary(), "losses": losses}


def run_project(args, overrides: dict, data: str, hardware: str = "h200", sft: bool = False,
                base: str = "nf4", attention: str | None = None, extra_callbacks: list | None = None,
                logging_steps: int = 1) -> dict:
    """The QLoRA stage's code path (or the SFT stage's with `sft`) on fixed or real-length rows;
    `base`: the nf4 or gptq checkpoint made by `make`; `attention`: another attention implementation
    (an experiment: the stage uses sdpa)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ptq_qlora.stages.qlora import trainable_quantized_model
    from ptq_qlora.training import train_tokenized

    hw = profile(hardware, overrides)
    resident = memory_start()
    folder = Path(args.dir) / ("bf16" if sft else base)
    tokenizer = word_tokenizer(32000)  # pad id 0; the rows' ids stay below every shape's vocab
    if sft:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16 if CUDA else torch.float32,
                                                     attn_implementation=hw.attn_implementation,
                                                     device_map={"": 0} if CUDA else None)
    else:
        torch.manual_seed(0)
        model, _ = trainable_quantized_model(qcfg("gptq" if base == "gptq" else "bnb"), folder, hw, TARGETS,
                                             {"r": 16, "alpha": 32, "dropout": 0.0})
    loaded_gib = torch.cuda.memory_allocated() / 2**30 if CUDA else 0.0
    held = {}  # what the loaded model holds, by dtype (explains a peak)
    for t in [*model.parameters(), *model.buffers()]:
        held[str(t.dtype)] = held.get(str(t.dtype), 0) + t.numel() * t.element_size() / 2**30
    if attention:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(attention)
    vocab = min(model.config.vocab_size, 32000)
    steps = args.real_steps if data == "real" else args.steps
    if data == "real":
        rows = real_rows(args.lengths, args.real_rows, vocab)
    else:
        rows = fixed_rows(hw.train_batch_size * steps, args.seq, vocab)
    train_cfg = {"lr": 1e-4, "scheduler": "constant", "epochs": 1, "max_steps": steps, "warmup": 0,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": logging_steps,
                 "save_steps": 100_000, "save_total_limit": 1, "group_by_length": data == "real"}
    clock, callback = trainer_clock()
    clock.mark(0)
    metrics = train_tokenized(model, tokenizer, Dataset.from_list(rows), train_cfg, hw,
                              Path(f"/tmp/qlora_speed_{os.getpid()}_{time.time_ns()}"), seed=0,
                              max_length=args.max_length, callbacks=[callback, *(extra_callbacks or [])])
    result = {**clock.summary(), "peak_gib": peak_gib(), "resident_gib": resident, "loaded_gib": loaded_gib,
              "held_gib_by_dtype": {k: round(v, 3) for k, v in held.items()},
              "losses": [round(x, 4) for x in metrics["loss_curve"]], "rows": len(rows),
              "train_rows": metrics["train_rows"], "hardware": vars(hw) | {"name": hardware},
              "tokens_per_step_mean": metrics["train_tokens_seen"] / max(metrics["train_steps"], 1)}
    del model
    return result


def run_project_in_plain_loop(args, overrides: dict) -> dict:
    """The project's QLoRA model path (the h200 profile's model-side options: fused_lora, bf16 frozen
    weights, Liger, the offloaded checkpoint) trained by the peers' plain loop instead of the stage's
    Trainer: what the Trainer's own step costs (clipping, logging, token counting, its scheduler)."""
    from ptq_qlora.activation_offload import install_offloaded_checkpointing

    hw = profile("h200", overrides)
    resident = memory_start()
    model = load_project_model(args, hw)
    if CUDA:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())
    install_offloaded_checkpointing(model)
    with torch.autocast("cuda" if CUDA else "cpu", dtype=torch.bfloat16, enabled=CUDA):
        result = plain_training_loop(model, SimpleNamespace(batch=hw.train_batch_size, steps=args.steps, seq=args.seq),
                                     model.device)
    result.update(peak_gib=peak_gib(), resident_gib=resident, hardware=vars(hw) | {"name": "h200"})
    del model
    return result


def run_without_sibling_groups(args) -> dict:
    """The h200 profile with fused_lora's q/k/v and gate/up grouping off (each LoRA layer its own node)."""
    from ptq_qlora.adapters import fused_lora

    siblings, fused_lora.SIBLINGS = fused_lora.SIBLINGS, ()
    try:
        return run_project(args, {}, "fixed")
    finally:
        fused_lora.SIBLINGS = siblings


def busy_and_idle(events, largest: int = 12) -> dict:
    """From a profile's device kernels: the window's wall time (first kernel start to last kernel end),
    the time at least one kernel runs (union of intervals over all streams), the idle rest (launch
    gaps, host waits), in ms, and the `largest` idle gaps: where in the window (ms from its start), how
    long, and the kernel that ended the wait (at a step boundary: the host's bookkeeping; inside a
    step: launch-bound stretches)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
                   and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy, start, end, gaps = 0.0, spans[0][0], spans[0][1], []
    for a, b, name in spans[1:]:
        if a > end:
            busy, start = busy + end - start, a
            gaps.append((a - end, end - spans[0][0], name))
        end = max(end, b)
    busy += end - start
    wall = max(b for _, b, _ in spans) - spans[0][0]
    return {"window_ms": round(wall / 1e3, 2), "busy_ms": round(busy / 1e3, 2), "idle_ms": round((wall - busy) / 1e3, 2),
            "largest_gaps": [{"at_ms": round(at / 1e3, 2), "ms": round(length / 1e3, 2), "next_kernel": name[:80]}
                             for length, at, name in sorted(gaps, reverse=True)[:largest]]}


def run_profile(args, overrides: dict | None = None) -> dict:
    """Where a step of the project's QLoRA path spends its time: torch.profiler over steps 3-4 of the
    `project` mode (with `overrides`), kernels grouped by name, the 40 largest by device (CPU: host)
    self time, and how much of the window the GPU ran no kernel at all."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    holder = {}

    class Window(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 2:
                holder["prof"] = profile(activities=activities)
                holder["prof"].__enter__()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 4 and "prof" in holder:
                sync()
                holder["prof"].__exit__(None, None, None)

    result = run_project(args, overrides or {}, "fixed", extra_callbacks=[Window()])
    key = "self_device_time_total" if CUDA else "self_cpu_time_total"
    events = [e for e in holder["prof"].key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:40]
    result["profile"] = {"steps": 2, "total_ms": total / 1e3, "time": key, **busy_and_idle(holder["prof"].events()),
                         "top": [{"name": e.key[:110], "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2),
                                  "share": round(getattr(e, key) / total, 4)} for e in top]}
    return result


def run_memory(args, base: str) -> dict:
    """What is live when the project's QLoRA step peaks, by allocating line (benchmarks/memory_trace.py):
    the allocator records every allocation with its Python stack from before the model loads to the end of
    step 3 (4 steps run); `memory_nf4` beside `memory_gptq` locates what GPTQ adds over NF4."""
    from transformers import TrainerCallback

    from memory_trace import live_at_peak

    holder = {}

    class StopAfterStep3(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 3 and CUDA and "trace" not in holder:
                holder["trace"] = torch.cuda.memory._snapshot()["device_traces"][0]
                torch.cuda.memory._record_memory_history(enabled=None)

    if CUDA:
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    try:
        result = run_project(SimpleNamespace(**{**vars(args), "steps": 4}), {}, "fixed", base=base,
                             extra_callbacks=[StopAfterStep3()])
    finally:
        if CUDA:
            torch.cuda.memory._record_memory_history(enabled=None)
    result["memory_at_peak"] = live_at_peak(holder.get("trace", []), top=20)
    return result


def run_gen(args) -> dict:
    """The eval stage's batched generation vs HF generate one prompt at a time, same model and prompts."""
    from transformers import GenerationConfig

    from ptq_qlora.generation import generate_batched
    from ptq_qlora.quantizers import load_quantized

    hw = profile("h200", {})
    resident = memory_start()
    model = load_quantized(qcfg(), Path(args.dir) / "nf4", hw.dtype, for_training=False)
    vocab = min(model.config.vocab_size, 32000)
    tokenizer = word_tokenizer(vocab)
    spec = json.loads(Path(args.lengths).read_text())["prompt_completion_source"]
    task_rows = [p for p, _, s in spec if s != "general"] or [p for p, _, _ in spec]
    gen = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"t{i}" for i in torch.randint(FIRST_ID, vocab, (n,), generator=gen).tolist())
               for n in task_rows[:args.gen_prompts]]
    new = args.new_tokens
    # batch 1, HF generate: greedy, exactly `new` tokens (min_new_tokens) so both sides do the same work
    config = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=2)
    one_tokens, t0 = 0, None
    with torch.inference_mode():
        for k, prompt in enumerate(prompts[:args.gen_single + 1]):
            if k == 1:  # the first prompt warms up
                sync()
                t0 = time.perf_counter()
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
            out = model.generate(**ids, generation_config=config)
            if k >= 1:
                one_tokens += out.shape[1] - ids["input_ids"].shape[1]
    sync()
    one_s = time.perf_counter() - t0
    # the eval stage's path: length-sorted batches of eval_batch_size; greedy, stops at </s> (rare on the
    # random model); the tokens counted are the ones it returned
    sync()
    t0 = time.perf_counter()
    texts = generate_batched(model, tokenizer, prompts, max_new_tokens=new, batch_size=hw.eval_batch_size)
    sync()
    batched_s = time.perf_counter() - t0
    batched_tokens = sum(len(t.split()) for t in texts)
    result = {"prompts": len(prompts), "prompt_tokens_mean": sum(task_rows[:len(prompts)]) / len(prompts),
              "new_tokens": new, "hf_batch1": {"prompts": args.gen_single, "tokens": one_tokens, "seconds": one_s,
                                               "tok_s": one_tokens / one_s},
              "batched": {"batch_size": hw.eval_batch_size, "tokens": batched_tokens, "seconds": batched_s,
                          "tok_s": batched_tokens / batched_s},
              "speedup": (batched_tokens / batched_s) / (one_tokens / one_s), "peak_gib": peak_gib(),
              "resident_gib": resident}
    del model
    return result


def rel(grads: dict, reference: dict) -> float:
    """||g - g_ref|| / ||g_ref|| over all LoRA gradients (the project's relative_gradient_error)."""
    from ptq_qlora.quantizers.testing import relative_gradient_error

    return relative_gradient_error(grads, reference)[0]


def load_project_model(args, hw):
    """The QLoRA stage's model over the `make` NF4 checkpoint with `hw`'s options, LoRA r16 on TARGETS,
    frozen weights in bf16 (as train_tokenized leaves them)."""
    from ptq_qlora.stages.qlora import trainable_quantized_model
    from ptq_qlora.training import keep_frozen_in_compute_dtype

    torch.manual_seed(0)
    model, _ = trainable_quantized_model(qcfg(), Path(args.dir) / "nf4", hw, TARGETS,
                                         {"r": 16, "alpha": 32, "dropout": 0.0})
    keep_frozen_in_compute_dtype(model, torch.bfloat16)
    return model


def randomize_lora_b(model, seed: int = 1, scale: float = 0.01) -> None:
    """LoRA B starts at zero, which would make every lora_A gradient zero: give it random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def run_check(args) -> dict:
    """Requirement 3 on the GPU: on the same real-length rows, the fast path (packed padding-free rows,
    bf16 frozen weights, Liger kernels) gives the plain path's loss and LoRA gradients (padded batch,
    peft's fp32 upcast, no Liger) within bf16 tolerance; negative control: the packed rows without
    position_ids (examples attend to each other)."""
    from datasets import Dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ptq_qlora.adapters import attach_lora
    from ptq_qlora.packing import PackedRowsCollator
    from ptq_qlora.quantizers import load_quantized
    from ptq_qlora.training import attention_for_packed_rows, keep_frozen_in_compute_dtype, prepare_padding_free

    hw = profile("h200", {})
    resident = memory_start()
    model = load_quantized(qcfg(), Path(args.dir) / "nf4", hw.dtype, for_training=True)
    torch.manual_seed(0)
    model = attach_lora(model, TARGETS, r=16, alpha=32, dropout=0.0, gradient_checkpointing=True)
    randomize_lora_b(model)
    model.train()
    rows = real_rows(args.lengths, args.check_rows, min(model.config.vocab_size, 32000), seed=3)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(
        [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]}
         for r in rows])
    packed_rows = prepare_padding_free(Dataset.from_list(rows), hw.pack_length, args.max_length)
    packed = PackedRowsCollator(0, width=hw.pack_length)(list(packed_rows))
    device = model.device

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    steps = {"plain": loss_and_grads(padded)}  # peft's fp32 frozen weights, padded batch, no Liger
    # the noise floor of bf16 arithmetic: the same rows in reverse order, padded wider (same math)
    reordered = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=128)(
        [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]}
         for r in reversed(rows)])
    steps["plain_reordered"] = loss_and_grads(reordered)
    keep_frozen_in_compute_dtype(model, torch.bfloat16)
    steps["bf16_frozen"] = loss_and_grads(padded)  # compared with "plain" below, not with the reordered
    liger = False
    if CUDA:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model(), fused_linear_cross_entropy=False)
        liger = True
        steps["bf16_frozen_liger"] = loss_and_grads(padded)
    steps["fast"] = loss_and_grads(packed)  # + packed padding-free rows: the profile's path (sdpa)
    if CUDA:  # + flex attention for the packed rows (hardware.packed_attention)
        with attention_for_packed_rows(model, "flex_attention"):
            steps["fast_flex"] = loss_and_grads(packed)
    # + fused_lora (with its sibling groups), + the asynchronous offloaded checkpoint: the profile's whole path
    import contextlib

    from ptq_qlora.activation_offload import install_offloaded_checkpointing
    from ptq_qlora.adapters.fused_lora import fuse_lora_layers

    fuse_lora_layers(model)
    packed_attention = attention_for_packed_rows(model, "flex_attention") if CUDA else contextlib.nullcontext()
    with packed_attention:
        steps["fast_fused_lora"] = loss_and_grads(packed)
        install_offloaded_checkpointing(model)
        steps["fast_fused_lora_offload"] = loss_and_grads(packed)
    steps["leaky_control"] = loss_and_grads({k: v for k, v in packed.items() if k != "position_ids"})
    plain_loss, plain_grads = steps["plain"]
    names = list(steps)
    result = {"rows": len(rows), "packed_rows": len(packed_rows), "tokens": sum(len(r["input_ids"]) for r in rows),
              "padded_shape": list(padded["input_ids"].shape), "packed_shape": list(packed["input_ids"].shape),
              "liger": liger, "losses": {k: v[0] for k, v in steps.items()},
              "loss_rel_diff_vs_plain": {k: abs(v[0] - plain_loss) / plain_loss for k, v in steps.items()},
              "grad_rel_err_vs_plain": {k: rel(v[1], plain_grads) for k, v in steps.items()},
              # each step's own effect: against the step before it
              "grad_rel_err_vs_previous": {b: rel(steps[b][1], steps[a][1]) for a, b in zip(
                  [n for n in names if n != "plain_reordered"], [n for n in names if n != "plain_reordered"][1:])},
              "peak_gib": peak_gib(), "resident_gib": resident}
    fast = steps["fast_fused_lora_offload"][1]
    worst = max(plain_grads, key=lambda k: float((fast[k] - plain_grads[k]).norm() / plain_grads[k].norm()))
    result.update(worst_tensor=worst,
                  worst_tensor_rel_err=float((fast[worst] - plain_grads[worst]).norm() / plain_grads[worst].norm()))
    del model
    return result


def run_gptq_check(args) -> dict:
    """hardware.gptq_dequant_matmul on the GPU: the Triton dequantization it uses equals gptqmodel's
    torch dequantization, and loss and LoRA gradients equal those of the stock trainable kernel within
    bf16 rounding (noise floor: the stock kernel on the same rows in reverse batch order)."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    from ptq_qlora.adapters.fused_lora import fuse_lora_layers
    from ptq_qlora.quantizers import gptq_frozen
    from ptq_qlora.quantizers.gptq_frozen import dequantized_weight, use_frozen_dequant_matmul
    from ptq_qlora.stages.qlora import trainable_quantized_model

    hw = profile("h200", {"gptq_dequant_matmul": False, "fused_lora": False})
    resident = memory_start()
    torch.manual_seed(0)
    model, _ = trainable_quantized_model(qcfg("gptq"), Path(args.dir) / "gptq", hw, TARGETS,
                                         {"r": 16, "alpha": 32, "dropout": 0.0})
    randomize_lora_b(model)
    model.train()
    quantized = [m for m in model.modules() if hasattr(m, "qweight")]
    ids = torch.tensor([r["input_ids"] for r in fixed_rows(4, 512, min(model.config.vocab_size, 32000), seed=5)],
                       device=model.device)

    def loss_and_grads(x):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    steps = {"stock": loss_and_grads(ids), "stock_reversed_batch": loss_and_grads(ids.flip(0))}
    patched = use_frozen_dequant_matmul(model)
    memory_start()
    steps["frozen_dequant_matmul"] = loss_and_grads(ids)
    frozen_peak = peak_gib()
    # the stock kernel rounds each weight to float16 first, the frozen path straight to bf16: the same
    # path over float16-rounded weights, and autograd over the bf16 weights it computes, separate the
    # weights' rounding from the function's correctness (a random 7B amplifies tiny weight changes)
    direct = gptq_frozen.dequantized_weight
    gptq_frozen.dequantized_weight = lambda layer, dtype: direct(layer, torch.float16).to(dtype)
    try:
        steps["frozen_dequant_matmul_fp16_weights"] = loss_and_grads(ids)
    finally:
        gptq_frozen.dequantized_weight = direct
    compute = torch.bfloat16 if CUDA else torch.float32  # the check's autocast dtype (none on CPU)
    saved = {m: direct(m, compute) for m in quantized}
    for m in quantized:
        m.forward = lambda x, m=m: (x.to(compute) @ saved[m]) + (m.bias if m.bias is not None else 0)
    steps["autograd_over_bf16_weights"] = loss_and_grads(ids)
    del saved
    fused = fuse_lora_layers(model)
    steps["fused_lora"] = loss_and_grads(ids)
    dequant_err = max(float((dequantized_weight(m, torch.float32)
                             - PackableQuantLinear.dequantize_weight(m).float()).abs().max()) for m in quantized[:7])
    base_loss, base_grads = steps["stock"]
    result = {"kernel_classes": sorted({type(m).__name__ for m in quantized}), "patched_layers": patched,
              "triton_dequant_layers": sum(bool(getattr(m, "_frozen_triton_dequant", False)) for m in quantized),
              "dequant_max_abs_diff_triton_vs_torch": dequant_err, "check_batch": list(ids.shape),
              "losses": {k: v[0] for k, v in steps.items()},
              "loss_rel_diff_vs_stock": {k: abs(v[0] - base_loss) / base_loss for k, v in steps.items()},
              "grad_rel_err_vs_stock": {k: rel(v[1], base_grads) for k, v in steps.items()},
              "grad_rel_err_vs_bf16_weights": {k: rel(v[1], steps["autograd_over_bf16_weights"][1])
                                               for k, v in steps.items()},
              "fused_layers": fused,
              "peak_gib": peak_gib(), "peak_gib_frozen_step": frozen_peak, "resident_gib": resident}
    del model
    return result


def run_sdpa_check(args) -> dict:
    """Which attention kernels sdpa runs in the QLoRA path (profiler kernel names; torch 2.11 on an H200
    picks cuDNN's), run twice for the noise floor, and with flash forced (sdpa_kernel): loss and LoRA
    gradients on the same fixed rows (4 x seq, causal, no padding)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile as torch_profile

    hw = profile("h200", {})
    resident = memory_start()
    model = load_project_model(args, hw)
    randomize_lora_b(model)
    model.train()
    ids = torch.tensor([r["input_ids"] for r in fixed_rows(4, args.seq, min(model.config.vocab_size, 32000), seed=7)],
                       device=model.device)

    def loss_and_grads(backends):
        model.zero_grad(set_to_none=True)
        chosen = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with chosen, torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            with torch_profile(activities=[ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]) as prof:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
        names = sorted({e.key[:80] for e in prof.key_averages()
                        if any(w in e.key.lower() for w in ("flash", "cudnn", "fmha", "sdpa", "attention"))})
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}, names

    steps = {"torch_order": loss_and_grads(None), "torch_order_again": loss_and_grads(None),
             "flash_forced": loss_and_grads([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])}
    base_loss, base_grads, _ = steps["torch_order"]
    result = {"check_batch": list(ids.shape), "hardware": vars(hw) | {"name": "h200"},
              "attention_kernels": {k: v[2] for k, v in steps.items()},
              "losses": {k: v[0] for k, v in steps.items()},
              "loss_rel_diff_vs_torch_order": {k: abs(v[0] - base_loss) / base_loss for k, v in steps.items()},
              "grad_rel_err_vs_torch_order": {k: rel(v[1], base_grads) for k, v in steps.items()},
              "peak_gib": peak_gib(), "resident_gib": resident}
    del model
    return result


MODES = {
    "check": run_check,
    "sdpa_check": run_sdpa_check,
    "gptq_check": run_gptq_check,
    "hf": lambda a: run_hf(a, liger=False),
    "liger": lambda a: run_hf(a, liger=True),
    "project_before": lambda a: run_project(a, SPEED_OFF, "fixed"),
    "project": lambda a: run_project(a, {}, "fixed"),
    "project_offload": lambda a: run_project(a, {"activation_offload": True}, "fixed"),
    "project_nockpt": lambda a: run_project(a, {"gradient_checkpointing": False}, "fixed"),
    "hf_gptq": lambda a: run_hf(a, liger=False, base="gptq"),
    "project_gptq_plain": lambda a: run_project(a, {"gptq_dequant_matmul": False, "fused_lora": False}, "fixed",
                                                base="gptq"),
    "project_gptq": lambda a: run_project(a, {}, "fixed", base="gptq"),
    "real_before": lambda a: run_project(a, SPEED_OFF, "real"),
    "real": lambda a: run_project(a, {}, "real"),
    "real_flex": lambda a: run_project(a, {}, "real", attention="flex_attention"),
    "project_flex": lambda a: run_project(a, {}, "fixed", attention="flex_attention"),
    "project_unfused": lambda a: run_project(a, {"fused_lora": False}, "fixed"),
    "project_nogroup": lambda a: run_without_sibling_groups(a),
    "project_compiled": lambda a: run_project(a, {"compile_layers": True}, "fixed"),
    "project_keep": lambda a: run_project(a, {"keep_recomputed_weights": True}, "fixed"),
    "project_keep_loop": lambda a: run_project_in_plain_loop(a, {"keep_recomputed_weights": True}),
    "project_modelloss": lambda a: run_project(a, {"model_loss": True}, "fixed"),
    # the stage's own logging interval (TrainConfig.logging_steps = 5; the other modes log every step)
    "project_modelloss_log5": lambda a: run_project(a, {"model_loss": True}, "fixed", logging_steps=5),
    "project_gptq_modelloss": lambda a: run_project(a, {"model_loss": True}, "fixed", base="gptq"),
    "real_modelloss": lambda a: run_project(a, {"model_loss": True}, "real"),
    # the Trainer's host syncs moved to the step's end (+ model_loss: TRL's per-step metric syncs gone too)
    "project_deferred": lambda a: run_project(a, {"deferred_step_syncs": True}, "fixed"),
    "project_lean": lambda a: run_project(a, {"deferred_step_syncs": True, "model_loss": True}, "fixed"),
    "profile_lean": lambda a: run_profile(a, {"deferred_step_syncs": True, "model_loss": True}),
    # the h200 profile's own 4 data-loading workers (the other modes collate in the training process)
    "project_keep_workers": lambda a: run_project(a, {"keep_recomputed_weights": True, "dataloader_workers": 4}, "fixed"),
    "gen": run_gen,
    # what is live at the step's peak, by allocating line, over each base (GPTQ's extra memory over NF4)
    "memory_nf4": lambda a: run_memory(a, "nf4"),
    "memory_gptq": lambda a: run_memory(a, "gptq"),
    "profile": run_profile,
    "profile_keep": lambda a: run_profile(a, {"keep_recomputed_weights": True}),
    "sft1b": lambda a: run_project(a, {}, "real", sft=True),
    "sft1b_before": lambda a: run_project(a, SPEED_OFF, "real", sft=True),
}


def run(args) -> None:
    out = Path(args.out)
    started = time.time()
    import importlib
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger_kernel", "triton", "datasets"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", None) or importlib.metadata.version(name.replace("_", "-"))
        except Exception as exc:  # noqa: BLE001  (a missing package is a fact to record)
            versions[name] = f"missing ({type(exc).__name__})"
    emit(out, what="env", gpu=torch.cuda.get_device_name() if CUDA else "cpu", versions=versions)
    for mode in args.modes.split(","):
        if args.budget_s and time.time() - started > args.budget_s:
            emit(out, what="skipped", mode=mode, reason=f"budget {args.budget_s}s used")
            continue
        t0 = time.perf_counter()
        try:
            result = MODES[mode](args)
            emit(out, what="mode", mode=mode, arch=args.arch, dir=args.dir, seq=args.seq, batch=args.batch,
                 wall_s=round(time.perf_counter() - t0, 1), **result)
        except Exception as exc:  # keep going: the other modes' numbers still count
            traceback.print_exc()
            emit(out, what="error", mode=mode, err=f"{type(exc).__name__}: {exc}"[:1500])
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()


# --- table ---------------------------------------------------------------------------------------------------

def table(args) -> None:
    records = []
    for f in args.files:
        for line in Path(f).read_text().splitlines():
            try:  # a log line that merely starts with "{" is not a record
                records.append(json.loads(line)) if line.startswith("{") else None
            except json.JSONDecodeError:
                continue
    modes = {r["mode"]: r for r in records if r.get("what") == "mode"}
    leftovers = []
    for r in modes.values():  # memory an earlier mode left allocated (GPTQ models on CUDA, seen) is not this mode's
        if (r.get("resident_gib") or 0) > 0.5 and r.get("peak_gib") == r.get("peak_gib"):
            r["peak_gib"] -= r["resident_gib"]
            leftovers.append(f"{r['mode']} ({r['resident_gib']:.2f} GiB)")
    env = next((r for r in records if r.get("what") == "env"), {})
    if env:
        print(f"device: {env.get('gpu')}; {env.get('versions')}\n")
    runs = {}
    for r in records:
        if r.get("what") == "mode":
            runs.setdefault(r["mode"], []).append(r)
    for mode, rs in runs.items():  # repeated runs (e.g. alternated rounds): every one, the table shows the last
        if len(rs) > 1:
            print(f"{mode}, {len(rs)} runs: tok/s " + ", ".join(f"{r['tok_s']:,.0f}" for r in rs)
                  + "; peak GiB " + ", ".join(f"{r['peak_gib']:.2f}" for r in rs))
    stock = modes.get("hf", {}).get("tok_s")
    names = {"hf": "stock HF (transformers+peft+bnb, sdpa, ckpt)", "liger": "HF + Liger (apply_liger_kernel_to_*)",
             "project_before": "project QLoRA path, speed options off (before)",
             "project": "project QLoRA path, h200 profile (after)",
             "project_offload": "project, h200 profile + activation_offload",
             "project_nockpt": "project, h200 profile, no checkpointing",
             "project_flex": "project, h200 profile, flex attention (experiment)",
             "project_unfused": "project, h200 profile without fused_lora (peft's LoRA forward)",
             "project_nogroup": "project, h200 profile, fused_lora without the q/k/v, gate/up groups",
             "project_compiled": "project, h200 profile + compile_layers (experiment)",
             "project_keep": "project, h200 profile + keep_recomputed_weights",
             "project_keep_loop": "project's model path (+ keep_recomputed_weights) in the peers' plain loop",
             "project_keep_workers": "project + keep_recomputed_weights, the profile's 4 data-loading workers",
             "project_modelloss": "project, h200 profile + model_loss",
             "project_deferred": "project, h200 profile + deferred_step_syncs",
             "project_lean": "project, h200 profile + deferred_step_syncs + model_loss",
             "project_modelloss_log5": "project, h200 profile + model_loss, logging every 5 steps (the stage's default)",
             "real_modelloss": "project, h200 profile + model_loss, real-data rows (effective tok/s)",
             # fifth session call 1: an option since removed (torch already ran cuDNN's attention)
             "project_cudnn": "project, h200 profile + sdpa_priority [cudnn] (no effect: cuDNN already)",
             "project_cudnn_keep": "project, h200 profile + sdpa_priority [cudnn] + keep_recomputed_weights",
             "project_fusedlora": "project, h200 profile + one-addmm LoRA add (experiment, third session call 1)",
             "unsloth": "unsloth (FastLanguageModel, gradient ckpt \"unsloth\"; benchmarks/unsloth_peer.py)"}
    measured = modes.get("unsloth", {}).get("tok_s")  # the same GPU and batches, else the H100 reference
    unsloth = measured or UNSLOTH_H100
    ref = f"measured here {measured:,.0f}" if measured else f"H100 ref {UNSLOTH_H100:,}"
    print(f"| run | tok/s | step s | peak GiB | x stock HF | x unsloth ({ref}) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, label in names.items():
        r = modes.get(mode)
        if not r:
            continue
        tok = r["tok_s"]
        print(f"| {label} | {tok:,.0f} | {r['median_step_s']:.3f} | {r['peak_gib']:.2f} | "
              f"{tok / stock:.2f} | {tok / unsloth:.2f} |" if stock else
              f"| {label} | {tok:,.0f} | {r['median_step_s']:.3f} | {r['peak_gib']:.2f} | - | {tok / unsloth:.2f} |")
    gptq_rows = {"hf_gptq": "stock HF over GPTQ (peft GPTQ LoRA, gptqmodel auto_trainable)",
                 "project_gptq_plain": "project over GPTQ, h200 profile, gptq_dequant_matmul off",
                 "project_gptq": "project over GPTQ, h200 profile (gptq_dequant_matmul)",
                 "project_gptq_modelloss": "project over GPTQ, h200 profile + model_loss"}
    bnb, stock_gptq = modes.get("project"), modes.get("hf_gptq")
    if any(m in modes for m in gptq_rows):
        print("\n| over GPTQ | tok/s | step s | peak GiB | x stock HF over GPTQ | tok/s, memory x project over NF4 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for mode, label in gptq_rows.items():
            r = modes.get(mode)
            if r:
                vs_stock = f"{r['tok_s'] / stock_gptq['tok_s']:.2f}" if stock_gptq else "-"
                vs_bnb = f"{r['tok_s'] / bnb['tok_s']:.2f}, {r['peak_gib'] / bnb['peak_gib']:.2f}" if bnb else "-"
                print(f"| {label} | {r['tok_s']:,.0f} | {r['median_step_s']:.3f} | {r['peak_gib']:.2f} | {vs_stock} | {vs_bnb} |")
    fixed = modes.get("project", {}).get("tok_s")
    for mode, label in (("real_before", "real-data mix, padded + group_by_length (before)"),
                        ("real", "real-data mix, h200 profile (packed, padding-free)"),
                        ("real_flex", "real-data mix, h200 profile, flex attention (experiment)"),
                        ("real_modelloss", "real-data mix, h200 profile + model_loss"),
                        ("sft1b_before", "full SFT 1.1B shape, real mix, speed options off"),
                        ("sft1b", "full SFT 1.1B shape, real mix, h200 profile")):
        r = modes.get(mode)
        if r:
            base = modes.get("project_modelloss", {}).get("tok_s") if mode == "real_modelloss" else fixed
            ratio = f"{r['tok_s'] / base:.2f} of fixed-shape" if base and not mode.startswith("sft") else ""
            print(f"| {label} | {r['tok_s']:,.0f} effective | {r['median_step_s']:.3f} | {r['peak_gib']:.2f} | "
                  f"{ratio} | {r['tokens_per_step_mean']:,.0f} non-pad tokens/step |")
    g = modes.get("gen")
    if g:
        print(f"\ngeneration ({g['prompts']} prompts, mean {g['prompt_tokens_mean']:.0f} prompt tokens, "
              f"{g['new_tokens']} new tokens each): HF generate batch 1 {g['hf_batch1']['tok_s']:.1f} tok/s; "
              f"eval stage batched (batch {g['batched']['batch_size']}) {g['batched']['tok_s']:.1f} tok/s; "
              f"speedup {g['speedup']:.1f}x")
    pr = modes.get("profile")
    if pr:
        p = pr["profile"]
        print(f"\nprofile of {p['steps']} steps ({p['time']}, {p['total_ms']:.0f} ms in all): the 30 largest")
        print("| kernel / op | calls | ms | share |")
        print("| --- | ---: | ---: | ---: |")
        for e in p["top"]:
            print(f"| {e['name']} | {e['calls']} | {e['ms']:.1f} | {e['share']:.1%} |")
    c = modes.get("check")
    if c:
        print(f"\ncheck ({c['rows']} real-length rows, {c['tokens']} tokens; padded {c['padded_shape']} vs packed "
              f"{c['packed_shape']}; Liger {c['liger']}):")
        print("| path | loss | loss rel diff vs plain | LoRA grad rel err vs plain | vs the row above |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for k, loss in c["losses"].items():
            prev = c["grad_rel_err_vs_previous"].get(k)
            print(f"| {k} | {loss:.5f} | {c['loss_rel_diff_vs_plain'][k]:.2e} | {c['grad_rel_err_vs_plain'][k]:.2e} | "
                  f"{'' if prev is None else f'{prev:.2e}'} |")
        print(f"worst LoRA tensor (fast vs plain): {c['worst_tensor']} {c['worst_tensor_rel_err']:.2e}")
    gc_ = modes.get("gptq_check")
    if gc_:
        print(f"\ngptq_check (batch {gc_['check_batch']}, kernels {gc_['kernel_classes']}, {gc_['patched_layers']} layers "
              f"patched, {gc_['triton_dequant_layers']} on Triton dequant; dequant max |triton - torch| "
              f"{gc_['dequant_max_abs_diff_triton_vs_torch']:.2e}; peak {gc_['peak_gib']:.2f} GiB, frozen step "
              f"{gc_['peak_gib_frozen_step']:.2f} GiB):")
        for k, loss in gc_["losses"].items():
            vs_bf16 = gc_.get("grad_rel_err_vs_bf16_weights", {}).get(k)
            print(f"| {k} | loss {loss:.5f} | rel {gc_['loss_rel_diff_vs_stock'][k]:.2e} | "
                  f"LoRA grad rel err {gc_['grad_rel_err_vs_stock'][k]:.2e} |"
                  + ("" if vs_bf16 is None else f" vs autograd over the same bf16 weights {vs_bf16:.2e} |"))
    for r in records:
        if r.get("what") == "make_gptq":
            print(f"\nGPTQ quantization ({r['arch']}, {r['layers']} layers, pack_impl {r.get('pack_impl', 'default')}, "
                  f"fused block update {'on' if r.get('fused_block_update') else 'off (per-column loop)'}, "
                  f"{r['calibration_texts_given']} texts, "
                  f"<= {r['calibration_max_tokens']} tokens each): {r['quantize_seconds']:.1f} s "
                  f"({r['per_layer_s']} s/layer), peak {r['peak_gib']:.2f} GiB, "
                  f"{r['disk_bytes_before'] / 1e9:.2f} -> {r['disk_bytes_after'] / 1e9:.2f} GB")
        if r.get("what") == "gptq_release":  # benchmarks/gptq_release_check.py
            print(f"\nGPTQ model dropped ({r['layers']} layers of the 7B widths): allocated before {r['start_gib']:.2f} GiB; "
                  f"eval load {r['eval_loaded_gib']:.2f} -> {r['eval_after_drop_gib']:.2f} after drop; training load "
                  f"{r['training_loaded_gib']:.2f} -> {r['training_after_drop_gib']:.2f} after drop")
        if r.get("what") == "gptq":  # benchmarks/gptq_time_baseline.py (the baseline script)
            print(f"\nbaseline gptq_time.py ({r['layers']} layers, {r['samples']} x {r['seq']} tokens): "
                  f"{r['quantize_s']} s ({r['per_layer_s']} s/layer, ~{r['est_7b_32layers_min']} min for 32), "
                  f"peak {r['peak_gib']} GiB")
        if r.get("what") == "mode" and "window_ms" in r.get("profile", {}):  # run_profile on a GPU
            p = r["profile"]
            print(f"\n{r['mode']}: {p['steps']} steps profiled, {p['window_ms']:.0f} ms, kernels {p['busy_ms']:.0f} ms, "
                  f"GPU idle {p['idle_ms']:.0f} ms; largest gaps (ms into the window: ms, the kernel after): "
                  + ", ".join(f"{g['at_ms']:.0f}: {g['ms']:.1f} {g['next_kernel'][:40]}" for g in p.get("largest_gaps", [])))
    for r in records:
        if r.get("what") == "mode" and "memory_at_peak" in r:
            m = r["memory_at_peak"]
            print(f"\n{r['mode']}: peak {r['peak_gib']:.2f} GiB (traced {m['traced_peak_gib']:.2f}, at trace entry "
                  f"{m['peak_at_entry']:,} of {m['entries']:,}); live then, by allocating line:")
            for s in m["sites"]:
                print(f"  {s['gib']:7.3f} GiB  {s['blocks']:5d} blocks  {s['site']}")
    if leftovers:
        print("\npeak GiB above what earlier modes left allocated: " + ", ".join(leftovers))
    for r in records:
        if r.get("what") in ("error", "skipped"):
            print(f"{r['what']}: {r['mode']}: {r.get('err') or r.get('reason')}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--arch", default="llama2", choices=sorted(ARCHS))
    m.add_argument("--layers", type=int, default=None, help="default: the real depth")
    m.add_argument("--keep-bf16", action="store_true", help="keep the bf16 source (sft1b trains it)")
    m.add_argument("--gptq", action="store_true", help="also quantize with the project's GPTQ quantizer (timed)")
    m.add_argument("--gptq-random", action="store_true", help="also write a GPTQ checkpoint with random codes")
    m.add_argument("--out", default=None)
    ln = sub.add_parser("lengths")
    ln.add_argument("--out", required=True)
    ln.add_argument("--model", default="llama2-7b", help="whose prompt template")
    ln.add_argument("--tokenizer-model", default="smollm2-135m", help="a model config whose tokenizer is local")
    ln.add_argument("--task", default="dialogsum")
    ln.add_argument("--data", default="paper")
    ln.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ln.add_argument("--max-rows", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--arch", default="llama2", choices=sorted(ARCHS))
    r.add_argument("--modes", required=True, help=",".join(MODES))
    r.add_argument("--lengths", default=str(ROOT / ".site-speed" / "lengths.json"))
    r.add_argument("--batch", type=int, default=4, help="rows per step (hf); the project modes use the profile's")
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--real-steps", type=int, default=10)
    r.add_argument("--real-rows", type=int, default=1500)
    r.add_argument("--max-length", type=int, default=4000, help="the stage's max_input_tokens + max_output_tokens")
    r.add_argument("--check-rows", type=int, default=8)
    r.add_argument("--gen-prompts", type=int, default=64)
    r.add_argument("--gen-single", type=int, default=4, help="prompts timed at batch 1 (after one warm-up)")
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--budget-s", type=float, default=0, help="skip the remaining modes after this many seconds")
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"make": make, "lengths": lengths, "run": run, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
