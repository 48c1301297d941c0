"""Schemas of the `task` and `data` config groups (owned by ptq_qlora.data).

`conf/task/<name>.yaml` and `conf/data/<name>.yaml` start from these (Hydra ConfigStore names
`task/task_schema` and `data/data_schema`), so a misspelt key fails at compose time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TypeVar, Union

from omegaconf import DictConfig, OmegaConf

SPLITS = ("train", "dev", "test")
KINDS = ("classification", "generation")


@dataclass
class AlignScoreConfig:
    """AlignScore factual consistency of generation outputs (ptq_qlora/metrics/alignscore.py).
    Off unless `checkpoint` names an AlignScore .ckpt (AlignScore-base/large from the Hub repo
    yzha/AlignScore); then each prediction is scored against the task's input text."""

    checkpoint: Optional[str] = None
    backbone: Optional[str] = None  # None: the checkpoint's own (roberta-base / roberta-large)
    batch_size: int = 32
    device: Optional[str] = None  # None: the hardware profile's device


@dataclass
class TaskConfig:
    name: str = "???"
    kind: str = "???"  # classification | generation
    hub_id: Optional[str] = None  # the paper's tasks: always set; custom: a Hub id or null (local files)
    hub_revision: Optional[str] = None
    mirror: Optional[str] = None  # folder name under data.local_dir (the paper's tasks)
    # Registry key of the task builder (ptq_qlora.data.tasks.TASKS); None: `name`. Lets the custom
    # builder run under a task name of the user's choosing (`task.name=call_purpose`).
    builder: Optional[str] = None
    split_sizes: dict = field(default_factory=dict)  # {train, dev, test} as in the paper's Table 1
    # How dev/test are carved where the source lacks them (each task builder reads what it needs).
    dev_fraction: Optional[float] = None  # banking77: dev = this fraction of the source train split
    split_ratios: Optional[list] = None  # bitext: [train, dev, test] fractions of the only split
    # The full user instruction (str.format: `{text}` = the input, `{labels}` = the shuffled label
    # list; write literal braces as `{{ }}`).
    prompt_template: str = "???"
    label_separator: str = ", "
    text_field: str = "???"
    label_field: Optional[str] = None  # classification: column holding the gold label
    reference_field: Optional[str] = None  # generation: column holding the reference output
    id_field: Optional[str] = None  # column with a stable row id; None: the row's index in its split
    # Known label set, in canonical spelling. None: take it from the source (banking77's
    # label_names.json / the Hub ClassLabel). Rows whose label is outside it are skipped.
    labels: Optional[list] = None
    # The label set as a file: one label per line (blank lines skipped) or a JSON list (.json).
    labels_file: Optional[str] = None
    max_new_tokens: int = 32
    metrics: list = field(default_factory=list)
    # The custom task (conf/task/custom.yaml): the user's own rows, from local files or `hub_id`.
    # `path`: one JSONL / JSON / CSV / TSV / Parquet file, carved into train/dev/test by
    # `split_ratios` with data.seed; or `train_file` (+ `dev_file`, `test_file`): the user's own
    # splits, a missing dev/test split being carved from train the same way.
    path: Optional[str] = None
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    # Per-kind defaults ({classification: {...}, generation: {...}}) that `prompt_template`,
    # `metrics` and `max_new_tokens` may interpolate (`${.kind_defaults.${.kind}.metrics}`), so one
    # `task.kind=generation` switches them together. Unused by the paper's tasks.
    kind_defaults: Optional[dict] = None
    # Scoring setting, not data: left out of every stage's data lineage (ptq_qlora/stages/lineage.py).
    alignscore: AlignScoreConfig = field(default_factory=AlignScoreConfig)


@dataclass
class DataConfig:
    name: str = "???"
    source: str = "auto"  # auto (local mirror if its folder exists, else hub) | hub | local
    local_dir: Optional[str] = None  # folder holding the mirrors (<local_dir>/<mirror>/<split>.jsonl)
    seed: int = 42  # every split, sample and prompt shuffle derives from it
    # General-instruction rows mixed into train (and dev), as a fraction of the task's rows there.
    general_mix_ratio: float = 0.1
    general_in_dev: bool = True
    general_hub_id: str = "tatsu-lab/alpaca"
    general_hub_revision: Optional[str] = None
    general_mirror: str = "alpaca"
    general_prompt_template: str = "{instruction}"
    general_prompt_template_with_input: str = "{instruction}\n\n{input}"
    # Subsets of the paper-size splits (prefixes, so a smaller cap is a subset); null keeps the paper's sizes.
    max_train: Optional[int] = None
    max_dev: Optional[int] = None
    max_test: Optional[int] = None
    # Length filter (paper 4.2: 3200 / 800), applied when a tokenizer is passed.
    max_input_tokens: int = 3200
    max_output_tokens: int = 800


C = TypeVar("C", TaskConfig, DataConfig)


def as_schema(cfg: Union[C, DictConfig, dict], schema: type[C]) -> C:
    """A validated dataclass instance from a dataclass, a (Hydra) DictConfig node or a dict.

    Interpolations are resolved against the node's own root first (e.g. `${paths.data_dir}`),
    because merging a detached node into the schema would lose them.
    """
    if isinstance(cfg, schema):
        return dataclasses.replace(cfg)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in dict(cfg).items() if k != "defaults"})
    return OmegaConf.to_object(merged)


def load_yaml_config(path: Union[str, Path], schema: type[C], /, **overrides) -> C:
    """Read one `conf/task/*.yaml` or `conf/data/*.yaml` file without Hydra (tests, notebooks).

    Its Hydra `defaults` list is dropped; unresolvable interpolations such as `${paths.data_dir}`
    must be replaced through `overrides` (e.g. `local_dir=...`).
    """
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    raw.update(overrides)
    return as_schema(raw, schema)
