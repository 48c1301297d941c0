"""unsloth, the peer QLoRA framework, on the checkpoint, LoRA, rows, optimizer and clock of `run_hf` in
qlora_speed.py, so its row sits in the same table. Its own process (unsloth patches transformers, peft
and trl when imported) with its own packages: .site-unsloth (trl 1.15, which unsloth 2026.10.9 needs)
and transformers 5.17 from the GPU image; benchmarks/UNSLOTH.md has the install and run lines.

    python3 benchmarks/unsloth_peer.py --dir D --out results.jsonl      # D/nf4 written by `qlora_speed.py make`
    python3 benchmarks/unsloth_peer.py --from-bf16 D/bf16 --out ...     # `make --keep-bf16`: quantized on load
    python3 benchmarks/unsloth_peer.py --check                          # imports only: versions, device

The model is FastLanguageModel.from_pretrained(load_in_4bit=True): D/nf4 is a pre-quantized bnb NF4
(double quant) checkpoint with its tokenizer, so unsloth uses the quantization config stored there;
--from-bf16 quantizes the bf16 folder while loading, as ../shared/gpu-baselines/qlora_peers.py did for
the H100 figure. LoRA r16, alpha 32, dropout 0 on q,k,v,o,gate,up,down, use_gradient_checkpointing=
"unsloth"; AdamW lr 1e-4; batch 4 x 2048 rows from `fixed_rows` (same seed, same ids as run_hf).
Appends one {"what": "mode", "mode": "unsloth", ...} line (run_hf's keys plus versions) to --out, or
{"what": "error", ...} and exit status 1.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

# Set before unsloth is imported: no network (no usage statistics, hub calls, hf_transfer or auto-installs),
# fail instead of training a 7B on the CPU, and keep unsloth's generated modules out of the work tree.
UNSLOTH_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ENABLE_HF_TRANSFER": "0",
               "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_OFFLINE": "1", "UNSLOTH_AUTO_INSTALL": "0",
               "UNSLOTH_DISABLE_CPU_FALLBACK": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
               "TOKENIZERS_PARALLELISM": "false"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
# qlora_speed imports only torch at module level, so unsloth still comes before transformers/peft/trl
from qlora_speed import TARGETS, emit, memory_start, peak_gib, plain_training_loop  # noqa: E402

import torch  # noqa: E402

# unsloth 2026.10.9 declares trl<=1.15.0 and transformers<=5.17.0; the project's .site-speed has trl 1.16
# and transformers 5.23, so a path that finds those first is refused here rather than failing inside unsloth
PINNED = {"trl": "1.15.0", "transformers": "5.17.0"}
VERSIONS_OF = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton", "datasets",
               "unsloth", "unsloth_zoo", "torchao", "cut_cross_entropy", "xformers")


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def check_pins() -> None:
    from packaging.version import Version

    for name, highest in PINNED.items():
        found = version(name)
        if found == "missing" or Version(found) > Version(highest):
            where = getattr(importlib.util.find_spec(name), "origin", None) if found != "missing" else None
            raise SystemExit(f"unsloth_peer: {name} {found} ({where}) but unsloth 2026.10.9 needs {name}<={highest}: "
                             "put /tmp/site-unsloth first on PYTHONPATH and leave /tmp/site off it (benchmarks/UNSLOTH.md)")


def unmet_requirements() -> list[str]:
    """What unsloth / unsloth_zoo declare that this process does not satisfy (optional extras such as
    xformers or hf_transfer included): recorded beside the numbers, not fatal."""
    from packaging.requirements import Requirement

    unmet = []
    for dist in ("unsloth", "unsloth_zoo"):
        for text in importlib.metadata.requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            found = version(req.name)
            if found == "missing" or (req.specifier and not req.specifier.contains(found, prereleases=True)):
                unmet.append(f"{dist}: {req.name}{req.specifier} ({found})")
    return sorted(set(unmet))


def versions() -> dict:
    return {name: version(name) for name in VERSIONS_OF}


def import_unsloth():
    for key, value in UNSLOTH_ENV.items():
        os.environ.setdefault(key, value)
    check_pins()
    import unsloth  # noqa: F401  (patches transformers/peft/trl: before anything imports them)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def checkpoint(args) -> Path:
    path = Path(args.from_bf16) if args.from_bf16 else Path(args.dir) / "nf4"
    if not (path / "config.json").is_file():
        raise SystemExit(f"unsloth_peer: no checkpoint at {path} (write it with `qlora_speed.py make --dir D"
                         f"{' --keep-bf16' if args.from_bf16 else ''}`)")
    return path


def run(args) -> dict:
    path = checkpoint(args)
    FastLanguageModel = import_unsloth()
    resident = memory_start()
    t0 = time.perf_counter()
    model, _tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                          load_in_4bit=True, local_files_only=True)
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    load_s = time.perf_counter() - t0
    loaded_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    import bitsandbytes as bnb

    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the frozen NF4 bases
    # from here as run_hf: the same rows, loop and clock
    measured = plain_training_loop(model, args, model.get_input_embeddings().weight.device)
    return {**measured, "peak_gib": peak_gib(), "resident_gib": resident, "loaded_gib": loaded_gib,
            "load_s": round(load_s, 1), "linear4bit_layers": quantized,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "source": f"bf16 quantized on load ({path})" if args.from_bf16 else f"pre-quantized NF4 ({path})"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", help="the folder given to `qlora_speed.py make`; loads its nf4/")
    source.add_argument("--from-bf16", help="a bf16 checkpoint folder (make --keep-bf16 keeps D/bf16)")
    source.add_argument("--check", action="store_true", help="import unsloth and print versions only")
    ap.add_argument("--arch", default="llama2", help="recorded with the row (the shape `make` wrote)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="steps 3..N are timed (StepClock)")
    ap.add_argument("--out", default=None, help="JSON lines file to append to (required unless --check)")
    args = ap.parse_args(argv)
    if not args.check and not args.out:
        ap.error("--out is required")
    if args.steps < 3:
        ap.error("--steps must be at least 3 (steps 1-2 are warm-up, not timed)")
    out = Path(args.out) if args.out else None
    t0 = time.perf_counter()
    try:
        if args.check:
            import_unsloth()
            emit(out, what="unsloth_check", gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 versions=versions(), unmet_requirements=unmet_requirements())
            return 0
        result = run(args)
    except SystemExit as exc:
        emit(out, what="error", mode="unsloth", err=str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001  (recorded so the table says why the row is missing)
        traceback.print_exc()
        emit(out, what="error", mode="unsloth", err=f"{type(exc).__name__}: {exc}"[:1500])
        return 1
    emit(out, what="mode", mode="unsloth", arch=args.arch, dir=args.dir or str(Path(args.from_bf16).parent),
         seq=args.seq, batch=args.batch, wall_s=round(time.perf_counter() - t0, 1),
         gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **result,
         versions=versions(), unmet_requirements=unmet_requirements())
    return 0


if __name__ == "__main__":
    sys.exit(main())
