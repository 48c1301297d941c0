"""conf/experiment/paper/: the paper's Table 4 (appendix A.3) and section 4.2 settings, checked
against a copy of the table typed from the paper, on the composed config (nothing downloaded)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq_qlora.config import CONF_DIR, setup
from ptq_qlora.stages.lineage import sft_lineage, train_settings

setup()
REPO = CONF_DIR.parent
EXPERIMENTS = CONF_DIR / "experiment"

# Table 4 of Zhu, Khasanova & Chen (NAACL 2025 industry), appendix A.3, as printed:
#                        Learning rate    Scheduler
#                        Int     Ext      Int      Ext
# Qwen2-7B-SFT           3e-5    3e-5     linear   cosine
# + BNB-4bit + QLoRA     3e-5    3e-5     cosine   cosine
# + GPTQ-4bit + QLoRA    3e-5    3e-5     cosine   cosine
# Llama2-7B-SFT          6e-6    6e-6     linear   linear
# + BNB-4bit + QLoRA     2e-4    5e-4     cosine   linear
# + GPTQ-4bit + QLoRA    5e-4    5e-4     cosine   linear
# Mistral-7B-v0.3-SFT    6e-6    6e-6     linear   linear
# + BNB-4bit + QLoRA     5e-4    5e-4     linear   linear
# + GPTQ-4bit + QLoRA    5e-4    5e-4     linear   linear
TABLE4 = {  # model -> row -> column -> (learning rate, scheduler)
    "qwen2-7b": {
        "sft": {"int": (3e-5, "linear"), "ext": (3e-5, "cosine")},
        "bnb": {"int": (3e-5, "cosine"), "ext": (3e-5, "cosine")},
        "gptq": {"int": (3e-5, "cosine"), "ext": (3e-5, "cosine")},
    },
    "llama2-7b": {
        "sft": {"int": (6e-6, "linear"), "ext": (6e-6, "linear")},
        "bnb": {"int": (2e-4, "cosine"), "ext": (5e-4, "linear")},
        "gptq": {"int": (5e-4, "cosine"), "ext": (5e-4, "linear")},
    },
    "mistral-7b-v0.3": {
        "sft": {"int": (6e-6, "linear"), "ext": (6e-6, "linear")},
        "bnb": {"int": (5e-4, "linear"), "ext": (5e-4, "linear")},
        "gptq": {"int": (5e-4, "linear"), "ext": (5e-4, "linear")},
    },
}
# Section 4.2: two epochs per fine-tuning job; 3200 input / 800 output tokens.
EPOCHS, MAX_INPUT, MAX_OUTPUT = 2, 3200, 800
HUB_IDS = {"qwen2-7b": "Qwen/Qwen2-7B", "llama2-7b": "meta-llama/Llama-2-7b-hf",
           "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3"}
QUANTIZERS = {"bnb": ("bnb-nf4", "PTQ-BNB-4bit"), "gptq": ("gptq-4bit", "PTQ-GPTQ-4bit")}
GRID = [(m, q, c) for m in TABLE4 for q in QUANTIZERS for c in ("int", "ext")]


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.paths.output_dir = "/tmp/unused"  # the hydra: resolver only exists inside a Hydra run
    return cfg


def all_experiments() -> list[str]:
    return sorted(str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.rglob("*.yaml"))


def test_one_paper_experiment_per_model_quantizer_and_data_kind():
    expected = {f"paper/{m}_{q}_{c}" for m, q, c in GRID}
    assert len(expected) == 12 and set(all_experiments()) >= expected
    assert {e for e in all_experiments() if e.startswith("paper/")} == expected


@pytest.mark.parametrize("experiment", all_experiments())
def test_every_experiment_composes_and_resolves(experiment):
    cfg = make(f"experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == Path(experiment).name


@pytest.mark.parametrize("model, quant, column", GRID)
def test_experiment_matches_table4_and_section_4_2(model, quant, column):
    name = f"{model}_{quant}_{column}"
    cfg = make(f"experiment=paper/{name}")
    sft_lr, sft_scheduler = TABLE4[model]["sft"][column]
    qlora_lr, qlora_scheduler = TABLE4[model][quant][column]
    assert (cfg.sft.lr, cfg.sft.scheduler, cfg.sft.epochs) == (sft_lr, sft_scheduler, EPOCHS)
    assert (cfg.qlora.lr, cfg.qlora.scheduler, cfg.qlora.epochs) == (qlora_lr, qlora_scheduler, EPOCHS)
    # what the trainers are handed (the stage.lr/scheduler/epochs shortcuts included)
    for step, (lr, scheduler) in (("sft", (sft_lr, sft_scheduler)), ("qlora", (qlora_lr, qlora_scheduler))):
        settings = train_settings(cfg, step)
        assert (settings["lr"], settings["scheduler"], settings["epochs"]) == (lr, scheduler, EPOCHS)
    assert (cfg.data.max_input_tokens, cfg.data.max_output_tokens) == (MAX_INPUT, MAX_OUTPUT)
    assert (cfg.model.name, cfg.model.source) == (model, HUB_IDS[model])
    assert (cfg.quantizer.name, cfg.quantizer.label) == QUANTIZERS[quant]
    assert (cfg.stage.name, cfg.stage.target, list(cfg.stage.eval_points)) == ("pipeline", "qlora", ["sft", "ptq", "qlora"])
    assert (cfg.data.name, cfg.hardware.name, cfg.hardware.device) == ("paper", "a100", "cuda")
    assert cfg.experiment_name == name
    assert cfg.task.name == ("banking77" if column == "ext" else "custom")


@pytest.mark.parametrize("task", ["bitext", "dialogsum"])
def test_external_experiment_task_is_overridable_and_keeps_table4(task):
    cfg = make("experiment=paper/llama2-7b_bnb_ext", f"task={task}")
    assert cfg.task.name == task
    assert (cfg.sft.lr, cfg.sft.scheduler, cfg.qlora.lr, cfg.qlora.scheduler) == (6e-6, "linear", 5e-4, "linear")


def test_command_line_beats_the_experiment():
    cfg = make("experiment=paper/qwen2-7b_gptq_ext", "qlora.lr=1e-4", "sft.epochs=1", "hardware=h100")
    assert (cfg.qlora.lr, cfg.stage.lr, cfg.sft.epochs, cfg.hardware.name) == (1e-4, 1e-4, 1, "h100")
    assert cfg.sft.lr == 3e-5


def test_internal_experiment_takes_the_users_data():
    cfg = make("experiment=paper/mistral-7b-v0.3_bnb_int", "task.path=calls.jsonl", "task.kind=generation",
               "task.reference_field=summary")
    task = OmegaConf.to_container(cfg.task, resolve=True)
    assert (task["builder"], task["path"], task["metrics"][0]) == ("custom", "calls.jsonl", "rouge1")


def test_bnb_and_gptq_runs_of_a_model_share_their_sft_stage():
    for model in TABLE4:
        for column in ("int", "ext"):
            bnb, gptq = (make(f"experiment=paper/{model}_{q}_{column}") for q in QUANTIZERS)
            assert sft_lineage(bnb, "base") == sft_lineage(gptq, "base"), (model, column)
    # Qwen2's SFT schedulers differ between Int (linear) and Ext (cosine): different SFT stages
    int_, ext = make("experiment=paper/qwen2-7b_bnb_int"), make("experiment=paper/qwen2-7b_bnb_ext", "task=custom")
    assert sft_lineage(int_, "base") != sft_lineage(ext, "base")


def test_cfg_job_on_the_command_line_prints_table4_without_downloading(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PTQ_QLORA_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "train.py", "experiment=paper/qwen2-7b_bnb_ext", "--cfg", "job"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = OmegaConf.create(proc.stdout)
    assert printed.model.source == "Qwen/Qwen2-7B" and printed.quantizer.name == "bnb-nf4"
    assert (printed.sft.lr, printed.sft.scheduler, printed.qlora.lr, printed.qlora.scheduler) == (3e-5, "cosine", 3e-5, "cosine")
    assert (printed.data.max_input_tokens, printed.data.max_output_tokens, printed.experiment_name) == (3200, 800, "qwen2-7b_bnb_ext")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "hf").exists()  # nothing fetched or built


def test_external_grid_dry_run_lists_the_18_jobs():
    proc = subprocess.run(["bash", "experiments/paper_external_grid.sh", "--dry-run", "logger=wandb"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6
    jobs = set()
    for line in lines:
        words = line.split()
        assert words[1:3] == ["train.py", "-m"] and words[-1] == "logger=wandb"
        experiment = words[3].removeprefix("experiment=")
        assert (EXPERIMENTS / f"{experiment}.yaml").is_file() and experiment.endswith("_ext")
        jobs |= {(experiment, task) for task in words[4].removeprefix("task=").split(",")}
    assert len(jobs) == 18 and {t for _, t in jobs} == {"banking77", "bitext", "dialogsum"}
    # the BNB run of a model comes right before its GPTQ run, which reuses its SFT stage
    order = [line.split()[3] for line in lines]
    assert order[0].endswith("qwen2-7b_bnb_ext") and order[1].endswith("qwen2-7b_gptq_ext")
