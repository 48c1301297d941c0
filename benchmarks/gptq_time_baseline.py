"""(A copy of ../shared/gpu-baselines/gptq_time.py, the issue's baseline, run beside the project's quantizer; only this line added.)
GPTQ quantization time with gptqmodel on a GPU, Llama-2-7B layer shape, random weights.
Quantizes a model with LAYERS of the 7B's 32 decoder layers; time per layer extrapolates to 32.
Usage: python gptq_time.py [LAYERS] [NSAMPLES] [SEQ]. Prints JSON lines."""
import json, os, sys, tempfile, time
import torch

LAYERS, NS, SEQ = (int(a) for a in (sys.argv[1:] + ["4", "128", "2048"][len(sys.argv) - 1:])[:3])
root = os.environ.get("GPTQ_DIR", os.path.join(tempfile.gettempdir(), "gptq_probe"))
src, dst = f"{root}/src{LAYERS}", f"{root}/q{LAYERS}"


def emit(**kw):
    print(json.dumps(kw), flush=True)


def make():
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    if os.path.exists(f"{src}/config.json"):
        return
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=LAYERS, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 32000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>")); t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(src)


if __name__ == "__main__":
    make()
    from gptqmodel import GPTQModel, QuantizeConfig, BACKEND
    backend = BACKEND(os.environ.get("GPTQ_BACKEND", "gptq_triton"))  # AUTO probes Machete, whose JIT build downloads CUTLASS
    import gptqmodel
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 32000, (SEQ,), generator=g).tolist(), "attention_mask": [1] * SEQ}
             for _ in range(NS)]
    t0 = time.time()
    model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128, desc_act=False), backend=backend)
    t_load = time.time() - t0
    t0 = time.time()
    model.quantize(calib, batch_size=8)
    t_q = time.time() - t0
    t0 = time.time()
    model.save(dst)
    t_s = time.time() - t0
    emit(what="gptq", gptqmodel=gptqmodel.__version__, layers=LAYERS, samples=NS, seq=SEQ, load_s=round(t_load, 1),
         quantize_s=round(t_q, 1), save_s=round(t_s, 1), per_layer_s=round(t_q / LAYERS, 2),
         est_7b_32layers_min=round(t_q / LAYERS * 32 / 60, 1),
         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del model; torch.cuda.empty_cache()
    q = GPTQModel.load(dst, backend=backend)
    x = torch.randint(3, 32000, (1, 64), device="cuda")
    with torch.no_grad():
        out = q.model(input_ids=x).logits
    kinds = sorted({type(mod).__name__ for mod in q.model.modules() if "Linear" in type(mod).__name__})
    emit(what="reload", finite=bool(torch.isfinite(out).all()), linear_kinds=kinds)
