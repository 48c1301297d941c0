"""Requirement 3 of the speed issue on a trained model (the GPU checks use random 7B weights, which
amplify any rounding change): SmolLM2-135M-Instruct's real weights (from its Q4_1 GGUF), NF4 by the
project's bnb quantizer, LoRA r16 on all projections (B drawn small: at zero every A gradient is zero),
real text. LoRA loss and gradients of peft's forward and of hardware.fused_lora (with its q/k/v, gate/up
groups) under bf16 autocast, against peft in float32; the noise floor is peft under bf16 autocast on the
same rows in reverse order. CPU. Usage: python benchmarks/trained_model_check.py [--rows 4 --length 256]"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from ptq_qlora.config import CONF_DIR, setup

    setup()  # the structured config schemas Hydra composes against
    from ptq_qlora.adapters import attach_lora
    from ptq_qlora.adapters.fused_lora import fuse_lora_layers
    from ptq_qlora.models.loading import load_tokenizer, materialize_source
    from ptq_qlora.quantizers import QuantizerConfig, load_quantized, quantize
    from ptq_qlora.quantizers.testing import lora_gradients, relative_gradient_error

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2-135m"])
    folder = materialize_source(cfg.model)
    tokenizer = load_tokenizer(folder)
    text = (ROOT / "README.md").read_text() + (ROOT / "benchmarks" / "RESULTS.md").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    batch = ids[: args.rows * args.length].reshape(args.rows, args.length)
    bnb = QuantizerConfig(name="bnb-nf4", method="bnb", label="PTQ-BNB-4bit", bits=4, verify_reload=False)
    with tempfile.TemporaryDirectory() as tmp:
        quantize(bnb, folder, Path(tmp) / "nf4", tokenizer, [], "float32")

        def model(fused: bool):
            m = load_quantized(bnb, Path(tmp) / "nf4", compute_dtype="float32", for_training=True)
            torch.manual_seed(0)
            m = attach_lora(m, TARGETS, r=16, alpha=32, dropout=0.0)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
            if fused:
                fuse_lora_layers(m)
            return m

        steps = {"peft_fp32": lora_gradients(model(False), batch)}
        peft = model(False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            steps["peft_bf16"] = lora_gradients(peft, batch)
            loss_rev, grads_rev = lora_gradients(peft, batch.flip(0))
            steps["peft_bf16_reversed_rows"] = (loss_rev, grads_rev)
            steps["fused_lora_bf16"] = lora_gradients(model(True), batch)
    reference = steps["peft_fp32"]
    record = {"what": "trained_model_check", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF weights), NF4",
              "rows": args.rows, "length": args.length, "losses": {k: v[0] for k, v in steps.items()},
              "grad_rel_err_vs_fp32": {k: relative_gradient_error(v[1], reference[1])[0] for k, v in steps.items()},
              "grad_rel_err_vs_peft_bf16": {k: relative_gradient_error(v[1], steps["peft_bf16"][1])[0]
                                            for k, v in steps.items()}}
    record = json.loads(json.dumps(record, default=float))
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
