"""Is a GPTQ model's GPU memory given back when the model is dropped? (A GPTQ model whose torch.compile'd
dequantizer has run stayed allocated: 3.8-4.1 GiB per 7B on an H200, benchmarks/RESULTS.md.) Loads a
random-code GPTQ checkpoint of the Llama-2-7B widths (few layers) for evaluation (forward) and for
training (the QLoRA stage's model, one forward + backward), drops it, and prints the memory still
allocated after each. Usage: python benchmarks/gptq_release_check.py --dir D [--layers 4]"""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_speed import TARGETS, arch_config, profile, qcfg, random_gptq_checkpoint  # noqa: E402


def allocated_gib() -> float:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return 0.0


def holders_of_quantized_layers(depth: int = 4) -> list[str]:
    """Type chains of what still refers to a dropped model's GPTQ layers (empty when none survive)."""
    survivors = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and hasattr(o, "qweight")]
    chains = []
    for layer in survivors[:1]:
        level, seen = [layer], {id(survivors)}
        for _ in range(depth):
            refs = [r for o in level for r in gc.get_referrers(o) if id(r) not in seen and r is not level]
            seen.update(id(r) for r in refs)
            chains.append(sorted({type(r).__name__ for r in refs})[:8])
            level = [r for r in refs if not isinstance(r, (list,)) or len(r) < 50][:6]
    return [f"{len(survivors)} GPTQ layers alive"] + [" | ".join(c) for c in chains] if survivors else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    from ptq_qlora.quantizers import load_quantized
    from ptq_qlora.stages.qlora import trainable_quantized_model

    folder = Path(args.dir) / "gptq"
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    random_gptq_checkpoint(arch_config("llama2", args.layers), folder, device)
    record = {"what": "gptq_release", "layers": args.layers, "device": device, "start_gib": allocated_gib()}
    ids = torch.randint(3, 32000, (2, 128), device=device)
    for use in ("eval", "eval_without_compiled_dequantizer", "training"):
        if use.startswith("eval"):
            model = load_quantized(qcfg("gptq"), folder, "bfloat16", for_training=False)
            if use != "eval":  # is gptqmodel's torch.compile'd dequantizer what keeps an eval model alive too?
                from ptq_qlora.quantizers.gptq import drop_torch_compile

                drop_torch_compile(model)
            with torch.no_grad():
                model(input_ids=ids)
        else:
            model, _ = trainable_quantized_model(qcfg("gptq"), folder, profile("h200", {}), TARGETS,
                                                 {"r": 16, "alpha": 32, "dropout": 0.0})
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
        record[f"{use}_loaded_gib"] = torch.cuda.memory_allocated() / 2**30 if device != "cpu" else 0.0
        del model
        record[f"{use}_after_drop_gib"] = allocated_gib()
        record[f"{use}_kept_by"] = holders_of_quantized_layers()
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
