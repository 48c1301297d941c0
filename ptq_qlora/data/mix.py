"""The general-instruction mix (paper 4.1.3): general rows join train (and dev), never test.

The paper mixed 50k GPT-4 self-instruct rows (private) with every task. Here the stand-in is an
Alpaca-schema set (`instruction`, `input`, `output`; offline: the 5,000-row mirror), mixed at
`general_mix_ratio` x the task's rows in that split. Train and dev draw disjoint rows from one
seeded order of the pool, train first.
"""
from __future__ import annotations

import logging

from ptq_qlora.data.config import DataConfig
from ptq_qlora.data.filtering import SkipCounts, text_field
from ptq_qlora.data.prompts import general_prompt
from ptq_qlora.data.sources import ROW_KEY, load_raw
from ptq_qlora.data.tasks import seeded_shuffle

log = logging.getLogger(__name__)

GENERAL = "general"


def load_general_pool(data: DataConfig, skips: SkipCounts) -> tuple[list[dict], str]:
    """Every valid general row as an example, in a seeded order; returns (rows, source used)."""
    raw = load_raw(source=data.source, local_dir=data.local_dir, mirror=data.general_mirror,
                   hub_id=data.general_hub_id, hub_revision=data.general_hub_revision, splits=["train"])
    if raw.malformed.get("train"):
        skips.malformed[GENERAL] += raw.malformed["train"]
    rows = []
    for row in raw.splits["train"]:
        instruction, output = text_field(row, "instruction"), text_field(row, "output")
        if instruction is None or output is None:
            # e.g. the two Alpaca rows with an empty output: nothing to learn from them
            skips.skip("malformed", GENERAL, row[ROW_KEY], "missing/empty 'instruction' or 'output'")
            continue
        input_text = row.get("input") if isinstance(row.get("input"), str) else ""
        prompt = general_prompt(instruction, input_text.strip(), data.general_prompt_template,
                                data.general_prompt_template_with_input)
        rows.append({"id": f"{GENERAL}/train/{row[ROW_KEY]}", "prompt": prompt, "completion": output,
                     "reference": output, "source": GENERAL})
    return seeded_shuffle(rows, data.seed, "general:pool"), raw.source


def general_counts(data: DataConfig, n_task: dict[str, int]) -> dict[str, int]:
    """How many general rows each split gets (test: always 0)."""
    return {
        "train": round(data.general_mix_ratio * n_task["train"]),
        "dev": round(data.general_mix_ratio * n_task["dev"]) if data.general_in_dev else 0,
        "test": 0,
    }


def mix_general(splits: dict[str, list[dict]], pool: list[dict], wanted: dict[str, int], seed: int) -> dict:
    """Add general rows to train and dev and shuffle them in; test is returned unchanged."""
    if wanted["train"] + wanted["dev"] > len(pool):
        log.warning("general-instruction pool has %d rows, fewer than the %d wanted (train %d, dev %d); "
                    "train is filled first", len(pool), wanted["train"] + wanted["dev"], wanted["train"], wanted["dev"])
    take = {"train": pool[:wanted["train"]]}
    take["dev"] = pool[len(take["train"]):len(take["train"]) + wanted["dev"]]
    mixed = dict(splits)
    for split in ("train", "dev"):
        if take[split]:
            # interleave so that any prefix of the split (e.g. a max_steps run) sees both sources
            mixed[split] = seeded_shuffle(splits[split] + take[split], seed, f"general:mix:{split}")
    return mixed
