"""Every config composes, typos and unknown options fail at compose time with the valid names."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ptq_qlora.config import CONF_DIR, setup
from ptq_qlora.stages.lineage import qlora_lineage, sft_lineage, train_settings

setup()
GROUPS = ["model", "task", "data", "quantizer", "stage", "hardware", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def experiments() -> list[str]:
    root = CONF_DIR / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def make(overrides=(), name="config"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    cfg.paths.output_dir = "/tmp/unused"  # the hydra: resolver only exists inside a Hydra run
    return cfg


def test_default_config_resolves():
    cfg = make()
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["model"]["name"] == "smollm2-135m" and plain["stage"]["target"] == "sft"
    assert Path(plain["paths"]["data_dir"]).name == "data"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = make([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg[group].name == option


@pytest.mark.parametrize("experiment", experiments())
def test_every_experiment_composes(experiment):
    OmegaConf.to_container(make([f"experiment={experiment}"]), resolve=True)


def test_eval_entry_config_composes():
    cfg = make(name="eval")
    assert cfg.stage.name == "eval" and cfg.stage.target is None


def test_misspelt_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        make(["stage.lrr=1e-4"])
    with pytest.raises(ConfigCompositionException, match="batch_sise"):
        make(["hardware.batch_sise=3"])


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigCompositionException) as err:
        make(["model=gpt-17"])
    message = str(err.value)
    assert "gpt-17" in message and "smollm2-135m" in message and "tiny-random" in message


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException):
        make(["sft.lr=fast"])


def test_stage_lr_shortcut_drives_the_trained_step_and_its_lineage():
    base = make(["stage=qlora"])
    swept = make(["stage=qlora", "stage.lr=5e-4"])
    assert train_settings(base, "qlora")["lr"] == base.qlora.lr
    assert train_settings(swept, "qlora")["lr"] == 5e-4
    # the SFT stage a QLoRA sweep builds on keeps its lineage: it is trained once
    assert sft_lineage(base, "p") == sft_lineage(swept, "p")
    assert sft_lineage(make(["stage=sft"]), "p") != sft_lineage(make(["stage=sft", "stage.lr=1e-6"]), "p")


def test_speed_options_that_change_training_arithmetic_enter_only_the_lineages_they_touch():
    cpu = make(["stage=pipeline"])
    plain = make(["stage=pipeline", "hardware.dequantize_frozen_base=false"])
    assert cpu.hardware.dequantize_frozen_base  # the cpu profile's QLoRA trains over the dequantized base
    assert qlora_lineage(cpu, "p") != qlora_lineage(plain, "p")
    assert sft_lineage(cpu, "p") == sft_lineage(plain, "p")  # a QLoRA-only option leaves SFT alone
    packed = make(["stage=pipeline", "hardware.padding_free=true"])
    assert sft_lineage(packed, "p") != sft_lineage(cpu, "p") and qlora_lineage(packed, "p") != qlora_lineage(cpu, "p")
    assert sft_lineage(make(["stage=pipeline", "hardware.padding_free=true", "hardware.pack_length=512"]), "p") \
        != sft_lineage(packed, "p")
    # a GPTQ-only option enters the QLoRA lineage of GPTQ bases only
    gptq_path = make(["stage=pipeline", "hardware.gptq_dequant_matmul=true"])
    for method in ("gptq", "qalora"):
        assert qlora_lineage(gptq_path, "p", base_method=method) != qlora_lineage(cpu, "p", base_method=method)
    assert qlora_lineage(gptq_path, "p", base_method="bnb") == qlora_lineage(cpu, "p", base_method="bnb")
    fused = make(["stage=pipeline", "hardware.fused_lora=true"])  # QLoRA rounding only: SFT's lineage stays
    assert qlora_lineage(fused, "p") != qlora_lineage(cpu, "p") and sft_lineage(fused, "p") == sft_lineage(cpu, "p")
    compiled = make(["stage=pipeline", "hardware.compile_layers=true"])  # QLoRA only
    assert qlora_lineage(compiled, "p") != qlora_lineage(cpu, "p") and sft_lineage(compiled, "p") == sft_lineage(cpu, "p")
    fused_adam = make(["stage=pipeline", "hardware.fused_optimizer=true"])  # both steps' optimizer
    assert qlora_lineage(fused_adam, "p") != qlora_lineage(cpu, "p") and sft_lineage(fused_adam, "p") != sft_lineage(cpu, "p")
    # keeping recomputed weights changes no number: not in the lineage
    kept = make(["stage=pipeline", "hardware.keep_recomputed_weights=true"])
    assert qlora_lineage(kept, "p") == qlora_lineage(cpu, "p")


def test_bfloat16_adapters_over_a_base_trl_leaves_in_float32_enter_its_qlora_lineage(monkeypatch):
    from ptq_qlora.adapters import lora

    cpu = make(["stage=pipeline", "hardware.gptq_dequant_matmul=false"])
    assert qlora_lineage(cpu, "p", base_method="gptq") != qlora_lineage(cpu, "p", base_method="bnb")
    # the adapter's precision is the only difference: counted as TRL's cast, GPTQ's lineage is bnb's
    monkeypatch.setattr(lora, "ADAPTERS_CAST_BY_TRL", ("bnb", "gptq"))
    assert qlora_lineage(cpu, "p", base_method="gptq") == qlora_lineage(cpu, "p", base_method="bnb")


def test_t4_profile_has_no_bf16():
    assert make(["hardware=t4"]).hardware.dtype == "float16"


def test_gptq_calibration_batch_follows_the_hardware_profile():
    assert make(["quantizer=gptq-4bit"]).quantizer.calibration_batch_size == 1  # cpu: unchanged lineage
    assert make(["quantizer=gptq-4bit", "hardware=h200"]).quantizer.calibration_batch_size == 8
    assert make(["quantizer=qa-lora", "hardware=t4"]).quantizer.calibration_batch_size == 8
    assert make(["quantizer=gptq-4bit", "hardware=h200", "quantizer.calibration_batch_size=2"]).quantizer.calibration_batch_size == 2


def test_packed_attention_enters_the_lineage_only_with_packing():
    plain = make(["stage=pipeline"])
    flex_unpacked = make(["stage=pipeline", "hardware.packed_attention=flex_attention"])
    assert sft_lineage(flex_unpacked, "p") == sft_lineage(plain, "p")  # no packed rows: nothing changes
    packed = make(["stage=pipeline", "hardware.padding_free=true"])
    flex_cpu = make(["stage=pipeline", "hardware.padding_free=true", "hardware.packed_attention=flex_attention"])
    assert sft_lineage(flex_cpu, "p") == sft_lineage(packed, "p")  # refused on CPU (sdpa trains): not recorded
    gpu = ["stage=pipeline", "hardware.padding_free=true", "hardware.device=cuda"]
    packed, flex = make(gpu), make([*gpu, "hardware.packed_attention=flex_attention"])
    assert sft_lineage(flex, "p") != sft_lineage(packed, "p") and qlora_lineage(flex, "p") != qlora_lineage(packed, "p")
    assert make(["hardware=h200"]).hardware.packed_attention == "flex_attention"


def test_gptq_pack_impl_is_not_in_the_ptq_lineage():
    from ptq_qlora.stages.lineage import ptq_lineage

    default = make(["stage=pipeline", "quantizer=gptq-4bit"])
    assert ptq_lineage(make(["stage=pipeline", "quantizer=gptq-4bit", "quantizer.pack_impl=gpu"]), "p") == \
        ptq_lineage(default, "p")
