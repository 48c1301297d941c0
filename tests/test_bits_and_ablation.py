"""Other bit widths (GPTQ 2/3/8-bit, bnb FP4) and the no-SFT ablation (base -> PTQ -> QLoRA): their
configs, CPU kernels and LoRA gradients, end-to-end runs on tiny-random, and the report's bits axis
and ablation rows (on the real runs and on a synthetic store)."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import TINY
from ptq_qlora.config import CONF_DIR
from ptq_qlora.point_labels import parse, qlora_label
from ptq_qlora.quantizers import (
    QuantizerConfig, load_quantized, quantize, quantize_with_model, training_hazards, validate,
)
from ptq_qlora.quantizers.api import probe_input_ids
from ptq_qlora.quantizers.testing import (
    build_tiny_llama, byte_level_tokenizer, dequantized_reference, lora_gradients, random_texts,
    relative_gradient_error,
)
from ptq_qlora.report import build_report, write_report
from ptq_qlora.report.collect import _wandb_label
from ptq_qlora.report.plots import plot_bits
from ptq_qlora.report.significance import cell_tests
from ptq_qlora.report.synthetic import build_synthetic_store
from ptq_qlora.stages.lineage import ptq_lineage
from ptq_qlora.stages.refs import ModelRef
from ptq_qlora.stages.runner import run_job, steps_to_run

NEW_QUANTIZERS = {  # option -> (label, bits, quant_type)
    "gptq-2bit": ("PTQ-GPTQ-2bit", 2, None),
    "gptq-3bit": ("PTQ-GPTQ-3bit", 3, None),
    "gptq-8bit": ("PTQ-GPTQ-8bit", 8, None),
    "bnb-fp4": ("PTQ-BNB-FP4-4bit", 4, "fp4"),
}
GPTQ_OPTIONS = sorted(p.stem for p in (CONF_DIR / "quantizer").glob("gptq-*bit.yaml"))
# tiny-random jobs cut further than conftest.TINY: two steps per training stage, 4 test rows
SMALL = [*TINY, "task=bitext", "data.max_train=24", "data.max_test=4", "sft.max_steps=2", "qlora.max_steps=2",
         "eval.max_new_tokens=4"]
PNG = b"\x89PNG\r\n\x1a\n"


def make(*overrides, root: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.paths.output_dir = str(root / "out") if root else "/tmp/unused"
    if root:
        cfg.paths.store = str(root / "runs")
    return cfg


# ----------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("model", ["tiny-random", "smollm2-135m"])  # the models with combination files
def test_new_quantizer_options_compose_with_their_labels_and_group_sizes(model):
    four = OmegaConf.to_container(make("quantizer=gptq-4bit", f"model={model}").quantizer, resolve=True)
    assert four["group_size"] != 128  # the combination file applies
    for option, (label, bits, quant_type) in NEW_QUANTIZERS.items():
        q = OmegaConf.to_container(make(f"quantizer={option}", f"model={model}").quantizer, resolve=True)
        assert (q["name"], q["label"], q["bits"]) == (option, label, bits)
        if quant_type:
            assert q["quant_type"] == quant_type and q["method"] == "bnb"
        else:  # the model x gptq combination (group size, calibration) applies to every width
            assert q == {**four, "name": option, "label": label, "bits": bits}


def test_bits_override_equals_the_width_option_and_the_paper_configs_keep_their_names():
    by_override = make("quantizer=gptq-4bit", "quantizer.bits=3", "model=tiny-random")
    by_option = make("quantizer=gptq-3bit", "model=tiny-random")
    assert OmegaConf.to_container(by_override.quantizer, resolve=True) == \
        OmegaConf.to_container(by_option.quantizer, resolve=True)
    assert ptq_lineage(by_override, "sft") == ptq_lineage(by_option, "sft")
    assert ptq_lineage(by_option, "sft") != ptq_lineage(make("quantizer=gptq-4bit", "model=tiny-random"), "sft")
    paper = make("quantizer=gptq-4bit").quantizer
    assert (paper.name, paper.label) == ("gptq-4bit", "PTQ-GPTQ-4bit")
    assert (make("quantizer=bnb-nf4").quantizer.label, make("quantizer=bnb-nf4").quantizer.quant_type) == \
        ("PTQ-BNB-4bit", "nf4")


def test_every_gptq_width_has_each_models_combination_file():
    combos = CONF_DIR / "model_quantizer"
    models = [p.stem.removesuffix("_gptq-4bit") for p in combos.glob("*_gptq-4bit.yaml")]
    assert {"tiny-random", "smollm2-135m"} <= set(models) and len(GPTQ_OPTIONS) == 4
    for model in models:
        for option in GPTQ_OPTIONS:
            assert (combos / f"{model}_{option}.yaml").is_file(), f"{model}_{option}.yaml"


def test_ablation_experiment_composes_and_takes_any_quantizer():
    cfg = make("experiment=ablation/no_sft")
    assert cfg.stage.skip_sft and (cfg.stage.target, list(cfg.stage.eval_points)) == ("qlora", ["base", "ptq", "qlora"])
    assert (cfg.quantizer.name, cfg.experiment_name) == ("bnb-nf4", "no_sft")
    cfg = make("experiment=ablation/no_sft", "quantizer=gptq-3bit", "model=tiny-random")
    assert (cfg.quantizer.label, cfg.quantizer.group_size) == ("PTQ-GPTQ-3bit", 32)
    from ptq_qlora.tracking import run_group  # W&B group: no SFT stage to name it after

    assert run_group(cfg).startswith("base-")


def test_skip_sft_refuses_contradictions():
    base, given = ModelRef("base", "base", "b", "/m"), ModelRef("input", "input", "i", "/m")
    assert steps_to_run("qlora", base, skip_sft=True) == ["ptq", "qlora"]
    assert steps_to_run("ptq", base, skip_sft=True) == ["ptq"]
    with pytest.raises(ValueError, match="nothing to run"):
        steps_to_run("sft", base, skip_sft=True)
    with pytest.raises(ValueError, match="drop stage.input"):
        steps_to_run("qlora", given, skip_sft=True)


# ----------------------------------------------------------------------------------- kernels
GPTQ_TINY = dict(method="gptq", group_size=32, calibration_samples=16, min_calibration_samples=8,
                 calibration_max_tokens=64)


def gptq(bits: int, **extra) -> QuantizerConfig:
    return QuantizerConfig(name=f"gptq-{bits}bit", label=f"PTQ-GPTQ-{bits}bit", bits=bits, **{**GPTQ_TINY, **extra})


FP4 = QuantizerConfig(name="bnb-fp4", method="bnb", label="PTQ-BNB-FP4-4bit", bits=4, quant_type="fp4")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "sft")


def test_gptq_2_and_8_bit_quantize_and_reload_on_cpu(src, tmp_path):
    ids = probe_input_ids(259, batch=2, length=24)
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(input_ids=ids).logits
    error = {}
    for bits in (2, 8):
        stats, _ = quantize_with_model(gptq(bits), src, tmp_path / str(bits), byte_level_tokenizer(),
                                       random_texts(24), "float32")
        assert stats["bits"] == bits and stats["reload_max_abs_logit_diff"] == 0.0
        for for_training in (True, False):  # TorchAten is 4-bit only: both loads use TorchLinear
            model = load_quantized(gptq(bits), tmp_path / str(bits), "float32", for_training)
            assert {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")} == {"TorchLinear"}
        with torch.no_grad():
            error[bits] = ((model(input_ids=ids).logits - fp).norm() / fp.norm()).item()
    assert error[2] > 5 * error[8], error  # measured 0.64 vs 0.009 relative logit error


def test_backend_that_cannot_take_the_width_fails_before_any_work(src):
    tokenizer, texts = byte_level_tokenizer(), random_texts(24)
    aten = r"backend_eval=gptq_torch_aten \(TorchAtenLinear\) supports bits \[4\], not 3"
    with pytest.raises(ValueError, match=aten):
        validate(gptq(3, backend_eval="gptq_torch_aten"), src, tokenizer, texts)
    with pytest.raises(ValueError, match="unknown GPTQ backend 'no_such_kernel'"):
        validate(gptq(4, backend_train="no_such_kernel"), src, tokenizer, texts)
    validate(gptq(3), src, tokenizer, texts)  # the default kernels take 3 bits
    with pytest.raises(ValueError, match="quantizer=bnb-fp4"):  # bnb-nf4's label on FP4 weights
        validate(QuantizerConfig(method="bnb", label="PTQ-BNB-4bit", bits=4, quant_type="fp4"), src)


def test_unsupported_backend_fails_before_sft(tmp_path):
    with pytest.raises(ValueError, match="supports bits"):
        run_job(make(*SMALL, "stage=pipeline", "quantizer=gptq-3bit", "quantizer.backend_eval=gptq_torch_aten",
                     root=tmp_path))
    assert not list((tmp_path / "runs").glob("*sft-*"))


def _randomize_lora_b(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


NEW_FORMATS = {"gptq-3bit": gptq(3), "bnb-fp4": FP4}


@pytest.fixture(scope="module")
def checkpoints(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    for name, qcfg in NEW_FORMATS.items():
        quantize(qcfg, src, root / name, byte_level_tokenizer(), random_texts(24), "float32")
    return root


def test_fp4_eval_kernel_agrees_with_the_training_kernel(checkpoints):
    """bnb's packed CPU inference path (taken by eval-only loads) must compute FP4 as the exact
    training kernel does: measured max |logit difference| 0.003 (bf16 rounding), as for NF4."""
    ids = probe_input_ids(259, batch=3, length=40)
    with torch.no_grad():
        exact = load_quantized(FP4, checkpoints / "bnb-fp4", "float32", for_training=True)(input_ids=ids).logits
        fast = load_quantized(FP4, checkpoints / "bnb-fp4", "float32", for_training=False)(input_ids=ids).logits
    assert (fast - exact).abs().max() < 2e-2  # tests/test_quantizers.py's bf16-kernel tolerance


@pytest.mark.parametrize("name", sorted(NEW_FORMATS))
def test_lora_gradients_through_new_widths_survive_an_inference_pass(name, checkpoints):
    """The gradient guard of tests/test_lora_gradients.py for the new formats: LoRA gradients after
    a generate/no-grad pass equal those of the dequantized fp32 twin (same tolerances)."""
    from ptq_qlora.adapters import attach_lora

    qcfg = NEW_FORMATS[name]
    batch = probe_input_ids(259, batch=2, length=24)
    model = load_quantized(qcfg, checkpoints / name, "float32", for_training=True)
    # every quantized layer gets LoRA: the fp32 twin replaces exactly the LoRA-wrapped layers
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = attach_lora(model, targets, r=4, alpha=8, dropout=0.0)
    _randomize_lora_b(peft_model)
    ref_loss, ref_grads = lora_gradients(dequantized_reference(peft_model), batch)
    peft_model.eval()
    with torch.inference_mode():
        peft_model.generate(input_ids=batch[:, :8], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        peft_model(input_ids=batch)
    loss, grads = lora_gradients(peft_model, batch)
    total, worst = relative_gradient_error(grads, ref_grads)
    assert total < 1e-4 and worst < 1e-3, (total, worst)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and training_hazards(peft_model) == []


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT -> PTQ-GPTQ-3bit -> QLoRA, the no-SFT ablation with the same quantizer, and bnb FP4 of
    the same SFT model (PTQ + evaluation), in one store."""
    root = tmp_path_factory.mktemp("e2e")
    pipeline = run_job(make(*SMALL, "stage=pipeline", "quantizer=gptq-3bit", root=root))
    ablation = run_job(make(*SMALL, "experiment=ablation/no_sft", "quantizer=gptq-3bit", root=root))
    sft_dir = root / "runs" / f"sft-{pipeline['stages']['sft']['lineage']}"
    fp4 = run_job(make(*SMALL, "stage=ptq", "quantizer=bnb-fp4", f"stage.input={sft_dir}", root=root))
    return {"store": root / "runs", "pipeline": pipeline, "ablation": ablation, "fp4": fp4}


def _stage(store: Path, kind: str, lineage: str, name: str) -> dict:
    return json.loads((store / f"{kind}-{lineage}" / name).read_text())


def test_gptq_3bit_pipeline_runs_end_to_end(runs):
    summary, store = runs["pipeline"], runs["store"]
    assert list(summary["results"]) == ["SFT-16bit", "PTQ-GPTQ-3bit", "PTQ-GPTQ-3bit+QLoRA"]
    ptq = summary["stages"]["ptq"]
    stats = _stage(store, "ptq", ptq["lineage"], "metrics.json")
    assert (stats["bits"], ptq["quantizer"]["bits"], stats["group_size"]) == (3, 3, 32)
    assert stats["disk_bytes_after"] < stats["disk_bytes_before"]
    qlora = summary["stages"]["qlora"]["lineage"]
    assert (store / f"qlora-{qlora}" / "adapter" / "adapter_config.json").exists()
    for metrics in summary["results"].values():
        assert metrics["n_examples"] == 4 and 0 <= metrics["f1_micro"] <= 1


def test_bnb_fp4_ptq_of_the_sft_model(runs):
    summary, store = runs["fp4"], runs["store"]
    assert list(summary["results"]) == ["PTQ-BNB-FP4-4bit"]
    ptq = summary["stages"]["ptq"]
    config = json.loads((store / f"ptq-{ptq['lineage']}" / "model" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    assert _stage(store, "ptq", ptq["lineage"], "metrics.json")["quant_type"] == "fp4"
    assert _stage(store, "ptq", ptq["lineage"], "stage.json")["parent"]["point"] == "sft"


def test_no_sft_ablation_quantizes_the_base_model(runs):
    summary, store = runs["ablation"], runs["store"]
    assert list(summary["results"]) == ["base", "PTQ-GPTQ-3bit (no SFT)", "PTQ-GPTQ-3bit+QLoRA (no SFT)"]
    stages = summary["stages"]
    assert "sft" not in stages and len(list(store.glob("sft-*"))) == 1  # the pipeline's only
    meta = _stage(store, "ptq", stages["ptq"]["lineage"], "stage.json")
    assert meta["parent"]["point"] == "base" and meta["parent"]["lineage"] == stages["base"]["lineage"]
    assert meta["model_name"] == "tiny-random"
    assert stages["ptq"]["lineage"] != runs["pipeline"]["stages"]["ptq"]["lineage"]
    assert (store / f"qlora-{stages['qlora']['lineage']}" / "adapter" / "adapter_config.json").exists()


def test_report_sets_the_ablation_next_to_the_sft_based_rows(runs, tmp_path):
    report = build_report(runs["store"])
    assert [(m, label, report.table.bits[(m, label)]) for m, label, _ in report.table.rows] == [
        ("tiny-random", "SFT-16bit", 16),
        ("tiny-random", "PTQ-BNB-FP4-4bit", 4),
        ("tiny-random", "PTQ-GPTQ-3bit", 3),
        ("tiny-random", "PTQ-GPTQ-3bit+QLoRA", 3),
        ("tiny-random", "PTQ-GPTQ-3bit (no SFT)", 3),
        ("tiny-random", "PTQ-GPTQ-3bit+QLoRA (no SFT)", 3),
        ("tiny-random", "base", 16),
    ]
    shown = {r.label: r.metrics["f1_micro"] for r in report.rows}
    for summary in (runs["pipeline"], runs["ablation"], runs["fp4"]):
        assert {label: m["f1_micro"] for label, m in summary["results"].items()} == \
            {label: shown[label] for label in summary["results"]}
    pairs = {(t["a"], t["b"]) for t in report.per_example}
    assert ("PTQ-GPTQ-3bit+QLoRA (no SFT)", "PTQ-GPTQ-3bit+QLoRA") in pairs  # ablation vs the paper's recipe
    assert ("PTQ-GPTQ-3bit+QLoRA (no SFT)", "PTQ-GPTQ-3bit (no SFT)") in pairs
    assert "tiny-random + PTQ-GPTQ-3bit + QLoRA (no SFT)" in write_report(report, tmp_path, plots=False)[
        "table.md"].read_text()


# ----------------------------------------------------------------------------------- report
def test_point_labels_round_trip():
    p = parse("PTQ-BNB-FP4-4bit+QLoRA (no SFT)")
    assert (p.method, p.variant, p.bits, p.qlora, p.no_sft) == ("BNB", "FP4", 4, True, True)
    assert (p.ptq, p.with_sft, p.family) == ("PTQ-BNB-FP4-4bit (no SFT)", "PTQ-BNB-FP4-4bit+QLoRA", "PTQ-BNB-FP4")
    assert qlora_label("PTQ-GPTQ-3bit (no SFT)") == "PTQ-GPTQ-3bit+QLoRA (no SFT)"
    assert not parse("SFT-16bit").is_ptq and parse("SFT-16bit").bits == 16
    assert _wandb_label("qlora", "PTQ-GPTQ-4bit", 2, no_sft=True)[0] == "PTQ-GPTQ-2bit+QLoRA (no SFT)"


@pytest.fixture(scope="module")
def bits_store(tmp_path_factory):
    return build_synthetic_store(tmp_path_factory.mktemp("bits") / "runs", models=("tiny-random",), tasks=("bitext",),
                                 gptq_bits=(8, 2, 4, 3), bnb_quant_types=("fp4", "nf4"), no_sft_methods=("bnb",),
                                 with_noise=False, n_examples=20)


def test_bits_axis_orders_rows_by_method_then_bits(bits_store):
    report = build_report(bits_store.root)
    expected = [  # typed by hand: SFT, BNB (NF4 before FP4, SFT-based before no-SFT), GPTQ by width, base
        ("SFT-16bit", 16), ("PTQ-BNB-4bit", 4), ("PTQ-BNB-4bit+QLoRA", 4),
        ("PTQ-BNB-4bit (no SFT)", 4), ("PTQ-BNB-4bit+QLoRA (no SFT)", 4),
        ("PTQ-BNB-FP4-4bit", 4), ("PTQ-BNB-FP4-4bit+QLoRA", 4),
        ("PTQ-GPTQ-2bit", 2), ("PTQ-GPTQ-2bit+QLoRA", 2), ("PTQ-GPTQ-3bit", 3), ("PTQ-GPTQ-3bit+QLoRA", 3),
        ("PTQ-GPTQ-4bit", 4), ("PTQ-GPTQ-4bit+QLoRA", 4), ("PTQ-GPTQ-8bit", 8), ("PTQ-GPTQ-8bit+QLoRA", 8),
        ("base", 16),
    ]
    assert [(label, report.table.bits[(m, label)]) for m, label, _ in report.table.rows] == expected
    md = report.markdown().splitlines()
    assert md[0].startswith("| Models | Bits | bitext Precision |")
    assert md[2 + 7].startswith("| tiny-random + PTQ-GPTQ-2bit | 2 | ")
    records = report.table.records()
    assert [(r["point"], r["bits"], r["with_sft"]) for r in records][3:5] == [
        ("PTQ-BNB-4bit (no SFT)", 4, False), ("PTQ-BNB-4bit+QLoRA (no SFT)", 4, False)]
    assert records[0]["with_sft"] and not records[-1]["with_sft"]
    # the paper's cells and the ablation's are tested apart
    tasks = {t["task"]: t["cells"] for t in cell_tests(report.rows) if t["a"] == "PTQ+QLoRA" and t["b"] == "PTQ"}
    assert "no SFT" not in tasks["classification tasks"] and "(no SFT)" in tasks["classification tasks (no SFT)"]


def test_bits_plot_only_when_a_method_has_several_widths(bits_store, tmp_path):
    written = write_report(build_report(bits_store.root), tmp_path / "bits")
    assert written["bits_bitext.png"].read_bytes().startswith(PNG)
    four_bit_only = build_synthetic_store(tmp_path / "paper", models=("tiny-random",), tasks=("bitext",),
                                          with_noise=False, n_examples=4)
    report = build_report(four_bit_only.root)
    assert plot_bits(report.rows, "bitext", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert "| Bits |" not in report.markdown()
