"""The custom task (conf/task/custom.yaml, ptq_qlora/data/custom.py): the user's own rows from
local JSONL/CSV files or a Hub id, for classification (label set, shuffled in the prompt) and
generation (reference, ROUGE); splits from the user's files or carved 8/1/1; clear errors."""
import csv
import json
import logging
from pathlib import Path

import datasets
import pytest

from conftest import TINY
from ptq_qlora.data import DataConfig, TaskConfig, load_task_data, load_yaml_config
from ptq_qlora.data.custom import MissingFieldError
from ptq_qlora.data.prompts import shuffled_labels
from ptq_qlora.stages.runner import run_job

CONF = Path(__file__).resolve().parents[1] / "conf"
LABELS = ["billing", "cancellation", "outage", "upgrade"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def calls(n: int, start: int = 0) -> list[dict]:
    return [{"transcript": f"call {i}: the customer talks about {LABELS[i % 4]}", "purpose": LABELS[i % 4],
             "summary": f"customer {i} called about {LABELS[i % 4]}"} for i in range(start, start + n)]


def task(**overrides) -> TaskConfig:
    base = {"text_field": "transcript", "label_field": "purpose", "reference_field": "summary"}
    return load_yaml_config(CONF / "task" / "custom.yaml", TaskConfig, **{**base, **overrides})


def data(**overrides) -> DataConfig:
    overrides.setdefault("general_mix_ratio", 0.0)  # task rows only: no general-instruction mirror needed
    return load_yaml_config(CONF / "data" / "paper.yaml", DataConfig, local_dir="/nonexistent", **overrides)


def all_rows(d):
    return [r for split in (d.train, d.dev, d.test) for r in split]


# --- classification ----------------------------------------------------------------------------

def test_one_jsonl_file_is_carved_8_1_1_with_the_seed(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(50))
    d = load_task_data(task(path=str(path), labels=LABELS), data())
    assert (d.kind, d.labels, d.stats["source"]) == ("classification", LABELS, "local")
    assert d.stats["task_rows"] == {"train": 40, "dev": 5, "test": 5}
    ids = [set(s["id"]) for s in (d.train, d.dev, d.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set(d.train["completion"]) <= set(LABELS)
    again = load_task_data(task(path=str(path), labels=LABELS), data())
    other_seed = load_task_data(task(path=str(path), labels=LABELS), data(seed=7))
    assert list(again.test["id"]) == list(d.test["id"]) and set(other_seed.test["id"]) != set(d.test["id"])


def test_prompt_lists_every_label_once_in_a_per_example_order(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(40))
    d = load_task_data(task(path=str(path), labels=LABELS), data())
    orders = set()
    for row in all_rows(d):
        line = row["prompt"].splitlines()[1]  # the template's {labels} line
        assert sorted(line.split(", ")) == sorted(LABELS)
        assert line.split(", ") == shuffled_labels(LABELS, 42, row["id"])
        assert row["prompt"].endswith(row["prompt"].split("Text: ")[-1]) and "Text: call" in row["prompt"]
        orders.add(line)
    assert len(orders) > 5  # shuffled per example, not one fixed order


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_labels_file(tmp_path, suffix):
    labels_file = tmp_path / f"labels{suffix}"
    labels_file.write_text(json.dumps(LABELS) if suffix == ".json" else "\n".join(LABELS) + "\n\n")
    path = write_jsonl(tmp_path / "calls.jsonl", calls(20))
    assert load_task_data(task(path=str(path), labels_file=str(labels_file)), data()).labels == LABELS


def test_csv_train_dev_test_files_are_used_as_given(tmp_path):
    files = {s: write_csv(tmp_path / f"{s}.csv", calls(n, start)) for s, n, start in
             (("train", 12, 0), ("dev", 3, 100), ("test", 4, 200))}
    d = load_task_data(task(**{f"{s}_file": str(p) for s, p in files.items()}, labels=LABELS), data())
    assert d.stats["task_rows"] == {"train": 12, "dev": 3, "test": 4}
    assert all("call 2" in p for p in d.test["prompt"])  # the test file's rows (200..203)
    assert all(i.startswith("custom/dev/") for i in d.dev["id"])


def test_missing_dev_file_is_carved_from_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", calls(18))
    test = write_csv(tmp_path / "test.csv", calls(4, 100))
    d = load_task_data(task(train_file=str(train), test_file=str(test), labels=LABELS), data())
    assert d.stats["task_rows"] == {"train": 16, "dev": 2, "test": 4}  # 18 x 1/9 = 2


def test_data_caps_still_apply_and_a_cap_above_the_rows_is_no_shortfall(tmp_path, caplog):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(50))
    d = load_task_data(task(path=str(path), labels=LABELS), data(max_train=8, max_dev=2, max_test=3))
    assert d.stats["task_rows"] == {"train": 8, "dev": 2, "test": 3}
    with caplog.at_level(logging.WARNING):
        d = load_task_data(task(path=str(path), labels=LABELS), data(max_train=500))
    assert d.stats["task_rows"]["train"] == 40 and "fewer than" not in caplog.text


def test_labels_outside_the_set_are_skipped_and_counted(tmp_path, caplog):
    rows = calls(20) + [{"transcript": "odd one", "purpose": "refund"}, {"transcript": "n", "purpose": 3}]
    path = write_jsonl(tmp_path / "calls.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        d = load_task_data(task(path=str(path), labels=LABELS), data())
    assert d.stats["unknown_label_skipped"] == {"train": 2}
    assert "'refund' is not in the task's 4 labels" in caplog.text
    assert not any("odd one" in r["prompt"] for r in all_rows(d))
    assert sum(d.stats["task_rows"].values()) == 20


def test_numeric_labels_are_label_text_not_indices(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2 + 1} for i in range(20)]  # labels 1 and 2, as JSON numbers
    d = load_task_data(task(path=str(write_jsonl(tmp_path / "n.jsonl", rows)), text_field="text",
                            label_field="label", labels=["1", "2"]), data())
    assert sum(d.stats["task_rows"].values()) == 20 and not d.stats["unknown_label_skipped"]
    pairs = {(r["prompt"].split("Text: ")[-1], r["completion"]) for r in all_rows(d)}
    assert ("t0", "1") in pairs and ("t1", "2") in pairs


def test_empty_text_or_label_is_a_counted_malformed_row(tmp_path):
    rows = calls(20) + [{"transcript": "  ", "purpose": "billing"}, {"transcript": "x", "purpose": ""}, "not json"]
    d = load_task_data(task(path=str(write_jsonl(tmp_path / "c.jsonl", rows)), labels=LABELS), data())
    assert d.stats["malformed_skipped"] == {"train": 3}


def test_task_name_of_the_users_choosing(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(20))
    d = load_task_data(task(name="call_purpose", path=str(path), labels=LABELS), data())
    assert d.name == "call_purpose" and d.test["id"][0].startswith("call_purpose/")


# --- generation --------------------------------------------------------------------------------

def test_generation_task_uses_the_reference_field_and_rouge(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(30))
    cfg = task(kind="generation", path=str(path), prompt_template="Summarize the call.\n\n{text}")
    assert cfg.metrics == ["rouge1", "rouge2", "rougeL", "rougeLsum"] and cfg.max_new_tokens == 800
    d = load_task_data(cfg, data())
    assert (d.kind, d.labels) == ("generation", None)
    row = d.test[0]
    assert row["prompt"].startswith("Summarize the call.\n\ncall ") and row["completion"].startswith("customer ")
    assert row["reference"] == row["completion"]


def test_kind_switches_the_template_metrics_and_lengths_together():
    cls, gen = task(), task(kind="generation")
    assert "{labels}" in cls.prompt_template and cls.metrics == ["precision", "recall", "f1_micro"]
    assert gen.prompt_template == "{text}" and gen.metrics[0] == "rouge1" and gen.max_new_tokens == 800


def test_generation_row_without_reference_is_malformed(tmp_path):
    rows = calls(20) + [{"transcript": "no summary here", "summary": ""}]
    d = load_task_data(task(kind="generation", path=str(write_jsonl(tmp_path / "c.jsonl", rows))), data())
    assert d.stats["malformed_skipped"] == {"train": 1}


# --- errors ------------------------------------------------------------------------------------

def test_missing_file_names_the_path_and_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_task_data(task(path=str(tmp_path / "nope.jsonl"), labels=LABELS), data())
    message = str(err.value)
    assert str(tmp_path / "nope.jsonl") in message and "task.path" in message and "\n" not in message
    train = write_jsonl(tmp_path / "train.jsonl", calls(10))
    with pytest.raises(FileNotFoundError, match="task.test_file"):
        load_task_data(task(train_file=str(train), test_file=str(tmp_path / "t.csv"), labels=LABELS), data())


def test_missing_labels_file(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(10))
    with pytest.raises(FileNotFoundError, match="task.labels_file"):
        load_task_data(task(path=str(path), labels_file=str(tmp_path / "labels.txt")), data())


@pytest.mark.parametrize("setting, value", [("text_field", "transcrpt"), ("label_field", "intent"), ("id_field", "call_id")])
def test_missing_field_names_the_field_and_the_columns(tmp_path, setting, value):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(10))
    with pytest.raises(MissingFieldError) as err:
        load_task_data(task(path=str(path), labels=LABELS, **{setting: value}), data())
    message = str(err.value)
    assert f"{value!r} (task.{setting})" in message and "\n" not in message
    assert "its columns: transcript, purpose, summary" in message and str(path) in message


def test_missing_reference_field_in_a_csv(tmp_path):
    path = write_csv(tmp_path / "calls.csv", [{"text": "a", "label": "b"}] * 5)
    with pytest.raises(MissingFieldError, match=r"'summary' \(task.reference_field\).*its columns: text, label"):
        load_task_data(task(kind="generation", path=str(path), text_field="text"), data())


def test_no_label_set_says_how_to_give_one(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(10))
    with pytest.raises(ValueError, match="task.labels or task.labels_file"):
        load_task_data(task(path=str(path)), data())


@pytest.mark.parametrize("overrides, message", [
    ({}, "none is set"),
    ({"path": "a.jsonl", "hub_id": "me/calls"}, "got task.path and task.hub_id"),
    ({"dev_file": "dev.jsonl"}, "need task.train_file"),
])
def test_exactly_one_data_source(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_task_data(task(labels=LABELS, **overrides), data())


def test_labels_placeholder_in_a_generation_template_fails_early(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(10))
    with pytest.raises(ValueError, match=r"uses \{labels\}, which a generation task does not fill"):
        load_task_data(task(kind="generation", path=str(path), prompt_template="{labels}: {text}"), data())


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "calls.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        load_task_data(task(path=str(path), labels=LABELS), data())


def test_too_few_rows_to_carve(tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(2))
    with pytest.raises(ValueError, match="too few to carve dev, test"):
        load_task_data(task(path=str(path), labels=LABELS), data())


# --- Hub ---------------------------------------------------------------------------------------

def test_hub_dataset_with_class_labels_and_a_validation_split(monkeypatch):
    label = datasets.ClassLabel(names=LABELS)
    features = datasets.Features({"transcript": datasets.Value("string"), "purpose": label})

    def split(n, start):
        return datasets.Dataset.from_dict({"transcript": [f"hub call {i}" for i in range(start, start + n)],
                                           "purpose": [i % 4 for i in range(n)]}, features=features)

    calls_made = []

    def load_dataset(path, **kwargs):
        calls_made.append((path, kwargs))
        return datasets.DatasetDict({"train": split(20, 0), "validation": split(4, 100)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    d = load_task_data(task(hub_id="me/calls", hub_revision="v1"), data())
    assert calls_made == [("me/calls", {"revision": "v1"})]
    assert d.stats["source"] == "hub" and d.labels == LABELS  # from the ClassLabel names
    assert d.stats["task_rows"] == {"train": 18, "dev": 4, "test": 2}  # test carved from train (1/9)
    assert all("hub call 1" in p for p in d.dev["prompt"])  # the validation split (100..103)
    assert set(d.train["completion"]) <= set(LABELS)


# --- through Hydra and the runner --------------------------------------------------------------

def test_composed_config_evaluates_a_model_on_custom_classification_data(compose_cfg, tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(40))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    cfg = compose_cfg(*TINY, "task=custom", f"task.path={path}", "task.text_field=transcript",
                      "task.label_field=purpose", f"task.labels_file={labels}", "data.max_test=4",
                      "data.general_mix_ratio=0",
                      config_name="eval")
    summary = run_job(cfg)
    (metrics,) = summary["results"].values()
    assert metrics["n_examples"] == 4 and 0 <= metrics["f1_micro"] <= 1


def test_composed_config_evaluates_a_model_on_custom_generation_data(compose_cfg, tmp_path):
    path = write_jsonl(tmp_path / "calls.jsonl", calls(40))
    cfg = compose_cfg(*TINY, "task=custom", "task.kind=generation", f"task.path={path}",
                      "task.text_field=transcript", "task.reference_field=summary", "data.max_test=4",
                      "data.general_mix_ratio=0",
                      config_name="eval")
    assert list(cfg.task.metrics) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    summary = run_job(cfg)
    (metrics,) = summary["results"].values()
    assert metrics["n_examples"] == 4 and 0 <= metrics["rougeL"] <= 1
