"""ptq_qlora.data: paper split sizes, determinism, disjoint splits, shuffled label lists, the
general mix, the length filter, every kind of bad input, and the Hub path's arguments.

Size tests read the real mirrors at <repo_root>/../shared/data; bad-input tests write tiny
mirrors under tmp_path. No Hydra composition and no network."""
import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from ptq_qlora.data import COLUMNS, DataConfig, TaskConfig, load_task_data, load_yaml_config
from ptq_qlora.data.config import as_schema
from ptq_qlora.data.prompts import shuffled_labels

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MIRRORS = REPO.parent / "shared" / "data"
TASK_NAMES = ["banking77", "bitext", "dialogsum"]
PAPER_SIZES = {"banking77": (4500, 600, 600), "bitext": (4500, 600, 600), "dialogsum": (7000, 900, 900)}

needs_mirrors = pytest.mark.skipif(not MIRRORS.is_dir(), reason=f"dataset mirrors not found at {MIRRORS}")


def task_cfg(task: str, **overrides) -> TaskConfig:
    return load_yaml_config(CONF / "task" / f"{task}.yaml", TaskConfig, **overrides)


def data_cfg(name: str = "paper", local_dir=MIRRORS, **overrides) -> DataConfig:
    return load_yaml_config(CONF / "data" / f"{name}.yaml", DataConfig, local_dir=str(local_dir), **overrides)


def ids(ds) -> list[str]:
    return list(ds["id"])


def task_rows(ds) -> list[dict]:
    return [r for r in ds if r["source"] == "task"]


@pytest.fixture(scope="module")
def paper():
    """Paper-size splits of each task from the real mirrors (loaded once: ~0.5 s each)."""
    if not MIRRORS.is_dir():
        pytest.skip(f"dataset mirrors not found at {MIRRORS}")
    return {name: load_task_data(task_cfg(name), data_cfg("paper", general_mix_ratio=0.1)) for name in TASK_NAMES}


# --- sizes, determinism, disjoint splits ---------------------------------------------------------

@pytest.mark.parametrize("name", TASK_NAMES)
def test_paper_sizes_columns_and_source(paper, name):
    data = paper[name]
    assert data.stats["source"] == "local" and data.stats["general_source"] == "local"
    assert tuple(data.stats["task_rows"][s] for s in ("train", "dev", "test")) == PAPER_SIZES[name]
    for split in (data.train, data.dev, data.test):
        assert tuple(split.column_names) == COLUMNS
        assert len(set(split["id"])) == len(split)
    assert set(data.test["source"]) == {"task"}
    assert data.kind == ("generation" if name == "dialogsum" else "classification")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_do_not_overlap(paper, name):
    data = paper[name]
    train, dev, test = set(ids(data.train)), set(ids(data.dev)), set(ids(data.test))
    assert not (train & dev) and not (train & test) and not (dev & test)
    # the same text must not reach two splits under different ids either
    texts = {s: {r["prompt"].rsplit(": ", 1)[-1] if name != "dialogsum" else r["prompt"] for r in task_rows(d)}
             for s, d in (("train", data.train), ("dev", data.dev), ("test", data.test))}
    assert not (texts["test"] & (texts["train"] | texts["dev"]))


def test_where_each_split_comes_from(paper):
    b77 = paper["banking77"]
    assert all(r["id"].startswith("banking77/train/") for r in task_rows(b77.dev))  # dev carved from train
    assert all(i.startswith("banking77/test/") for i in ids(b77.test))
    ds = paper["dialogsum"]
    dev_sources = Counter(r["id"].split("/")[1] for r in task_rows(ds.dev))
    assert dev_sources == {"validation": 500, "train": 400}
    assert all(i.startswith("dialogsum/test/test_") for i in ids(ds.test))
    dialogues = Counter(i.rsplit("_", 1)[0] for i in ids(ds.test))
    assert len(dialogues) == 300 and set(dialogues.values()) == {3}  # whole dialogues, 3 references each


@needs_mirrors
def test_same_seed_same_rows_other_seed_other_rows():
    first = load_task_data(task_cfg("bitext"), data_cfg("cpu"))
    again = load_task_data(task_cfg("bitext"), data_cfg("cpu"))
    other = load_task_data(task_cfg("bitext"), data_cfg("cpu", seed=7))
    for split in ("train", "dev", "test"):
        assert ids(getattr(first, split)) == ids(getattr(again, split))
        assert list(getattr(first, split)["prompt"]) == list(getattr(again, split)["prompt"])
        assert set(ids(getattr(first, split))) != set(ids(getattr(other, split)))


@needs_mirrors
def test_cpu_caps_are_subsets_of_the_paper_splits(paper):
    capped = load_task_data(task_cfg("banking77"), data_cfg("cpu"))
    assert capped.stats["task_rows"] == {"train": 160, "dev": 32, "test": 100}
    full = paper["banking77"]
    for split in ("train", "dev"):
        assert {r["id"] for r in task_rows(getattr(capped, split))} <= set(ids(getattr(full, split)))
    assert ids(capped.test) == ids(full.test)[:100]


# --- prompts ----------------------------------------------------------------------------------

def label_list(prompt: str) -> list[str]:
    return prompt.split("\n")[1].split(", ")  # the templates put the label list on line 2


@pytest.mark.parametrize("name", ["banking77", "bitext"])
def test_prompts_list_every_label_once_in_a_per_example_order(paper, name):
    data = paper[name]
    n_labels = 77 if name == "banking77" else 27
    assert len(data.labels) == n_labels
    rows = list(data.test)
    orders = [tuple(label_list(r["prompt"])) for r in rows]
    for order, row in zip(orders, rows):
        assert Counter(order) == Counter(data.labels)  # each label exactly once
        assert row["completion"] == row["reference"] and row["completion"] in data.labels
    assert len(set(orders)) == len(orders)  # 600 examples, 600 different orders
    assert label_list(rows[0]["prompt"]) == shuffled_labels(data.labels, 42, rows[0]["id"])


def test_banking77_keeps_canonical_label_names(paper):
    labels = paper["banking77"].labels
    assert "card_arrival" in labels and "Refund_not_showing_up" in labels and "reverted_card_payment?" in labels


def test_dialogsum_rows(paper):
    row = paper["dialogsum"].test[0]
    assert "{text}" not in row["prompt"] and "#Person1#:" in row["prompt"]
    assert row["completion"] == row["reference"] and paper["dialogsum"].labels is None


# --- general-instruction mix -----------------------------------------------------------------

@pytest.mark.parametrize("name", TASK_NAMES)
def test_general_rows_only_in_train_and_dev_at_the_ratio(paper, name):
    stats = paper[name].stats
    assert stats["general_rows"]["test"] == 0
    for split in ("train", "dev"):
        assert stats["general_rows"][split] == round(0.1 * stats["task_rows"][split])
    general = [r for r in paper[name].train if r["source"] == "general"]
    assert all(r["id"].startswith("general/") and r["completion"] for r in general)
    train_general = {r["id"] for r in general}
    assert not train_general & {r["id"] for r in paper[name].dev if r["source"] == "general"}


@needs_mirrors
def test_general_mix_switches():
    no_dev = load_task_data(task_cfg("bitext"), data_cfg("cpu", general_in_dev=False))
    assert no_dev.stats["general_rows"] == {"train": round(0.1 * 160), "dev": 0, "test": 0}
    none = load_task_data(task_cfg("bitext"), data_cfg("cpu", general_mix_ratio=0.0))
    assert none.stats["general_rows"] == {"train": 0, "dev": 0, "test": 0} and none.stats["general_source"] is None


# --- length filter ----------------------------------------------------------------------------

class WhitespaceTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per whitespace-separated word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


@needs_mirrors
def test_length_filter_drops_and_counts():
    unfiltered = load_task_data(task_cfg("dialogsum"), data_cfg("cpu"))
    limit_in, limit_out = 150, 25
    too_long = {s: sum(len(r["prompt"].split()) > limit_in or len(r["completion"].split()) > limit_out
                       for r in getattr(unfiltered, s)) for s in ("train", "dev", "test")}
    assert all(too_long.values())  # the limits really bite
    data_ = data_cfg("cpu", max_input_tokens=limit_in, max_output_tokens=limit_out)
    filtered = load_task_data(task_cfg("dialogsum"), data_, tokenizer=WhitespaceTokenizer())
    assert filtered.stats["dropped_by_length"] == too_long
    for s in ("train", "dev", "test"):
        assert len(getattr(filtered, s)) == len(getattr(unfiltered, s)) - too_long[s]
        assert all(len(p.split()) <= limit_in for p in getattr(filtered, s)["prompt"])


# --- bad input (tiny hand-written mirrors) ---------------------------------------------------

def write_mirror(root: Path, name: str, splits: dict, label_names=None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        (folder / f"{split}.jsonl").write_text(text + "\n", encoding="utf-8")
    if label_names is not None:
        (folder / "label_names.json").write_text(json.dumps(label_names))
    return root


SMALL = {"train": 4, "dev": 1, "test": 2}
TOY_LABELS = ["card_arrival", "age_limit", "top_up_failed"]


def toy_banking77(tmp_path, train_extra=(), test_extra=()):
    train = [{"text": f"query {i}", "label": i % 3} for i in range(8)] + list(train_extra)
    test = [{"text": f"test query {i}", "label": i % 3} for i in range(3)] + list(test_extra)
    return write_mirror(tmp_path, "banking77", {"train": train, "test": test}, TOY_LABELS)


def load_toy(tmp_path, name="banking77", **data_overrides):
    data_overrides.setdefault("general_mix_ratio", 0.0)
    return load_task_data(task_cfg(name, split_sizes=SMALL), data_cfg("paper", tmp_path, **data_overrides))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError) as err:
        load_task_data(task_cfg("banking77", name="banking78"), data_cfg("cpu"))
    assert all(name in str(err.value) for name in ["banking78", *TASK_NAMES])


def test_missing_split_file_names_the_path_and_the_fix(tmp_path):
    write_mirror(tmp_path, "banking77", {"train": [{"text": "q", "label": 0}]}, TOY_LABELS)
    with pytest.raises(FileNotFoundError) as err:
        load_toy(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "banking77" / "test.jsonl") in message
    assert "data.local_dir" in message and "data.source=hub" in message and "\n" not in message


def test_local_source_without_the_mirror_folder_fails_the_same_way(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.local_dir"):
        load_toy(tmp_path, source="local")


def test_bad_source_value():
    with pytest.raises(ValueError, match="auto, hub, local"):
        load_task_data(task_cfg("bitext"), data_cfg("cpu", source="mirror"))


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    bad_train = ['{"text": "broken json', '["not", "an", "object"]', {"label": 0}, {"text": "  ", "label": 1},
                 {"text": None, "label": 1}, {"text": "no label"}]
    toy_banking77(tmp_path, train_extra=bad_train, test_extra=[{"text": "", "label": 0}])
    with caplog.at_level(logging.WARNING):
        data = load_toy(tmp_path)
    assert data.stats["malformed_skipped"] == {"train": 6, "test": 1}
    assert data.stats["task_rows"] == SMALL
    assert "not JSON" in caplog.text


def test_labels_outside_the_set_are_skipped_not_mapped(tmp_path, caplog):
    toy_banking77(tmp_path, train_extra=[{"text": "odd", "label": 99}, {"text": "neg", "label": -1},
                                         {"text": "bool", "label": True}])
    with caplog.at_level(logging.WARNING):
        data = load_toy(tmp_path)
    assert data.stats["unknown_label_skipped"] == {"train": 3}
    assert "99" in caplog.text
    assert not any(r["prompt"].endswith(("odd", "neg", "bool")) for s in (data.train, data.dev) for r in s)


def test_bitext_intent_outside_the_27_is_skipped(tmp_path):
    rows = [{"flags": "B", "instruction": f"request {i}", "category": "ORDER", "intent": "cancel_order",
             "response": "ok"} for i in range(20)]
    rows.append({**rows[0], "instruction": "new one", "intent": "cancel_subscription"})
    write_mirror(tmp_path, "bitext", {"train": rows})
    data = load_toy(tmp_path, name="bitext")
    assert data.stats["unknown_label_skipped"] == {"train": 1}
    assert "new one" not in "".join(p for split in (data.train, data.dev, data.test) for p in split["prompt"])


def test_dialogsum_row_without_summary_is_malformed(tmp_path):
    def rows(prefix, n):
        return [{"id": f"{prefix}_{i}", "dialogue": f"#Person1#: hi {i}", "summary": f"s{i}", "topic": "t"}
                for i in range(n)]
    test = [{**r, "id": f"{r['id']}_1"} for r in rows("test", 3)]
    write_mirror(tmp_path, "dialogsum", {"train": rows("train", 6) + [{"id": "train_x", "dialogue": "d", "summary": ""}],
                                         "validation": rows("dev", 1), "test": test})
    data = load_toy(tmp_path, name="dialogsum")
    assert data.stats["malformed_skipped"] == {"train": 1}
    assert data.stats["task_rows"] == SMALL


def test_split_empty_after_skipping_fails(tmp_path):
    write_mirror(tmp_path, "banking77", {"train": [{"text": f"q{i}", "label": 0} for i in range(10)],
                                         "test": [{"text": "q", "label": 42}]}, TOY_LABELS)
    with pytest.raises(ValueError, match="test split is empty"):
        load_toy(tmp_path)


def test_split_smaller_than_requested_warns_and_continues(tmp_path, caplog):
    toy_banking77(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = load_task_data(task_cfg("banking77", split_sizes={"train": 50, "dev": 1, "test": 2}),
                              data_cfg("paper", tmp_path, general_mix_ratio=0.0))
    assert data.stats["task_rows"]["train"] == 7 and "fewer than the 50 requested" in caplog.text


# --- Hub path (datasets.load_dataset monkeypatched) -------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    label = datasets.ClassLabel(names=TOY_LABELS)
    tables = {
        "PolyAI/banking77": datasets.DatasetDict({
            split: datasets.Dataset.from_dict(
                {"text": [f"{split} q{i}" for i in range(n)], "label": [i % 3 for i in range(n)]},
                features=datasets.Features({"text": datasets.Value("string"), "label": label}))
            for split, n in (("train", 20), ("test", 5))}),
        "tatsu-lab/alpaca": datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"instruction": [f"do {i}" for i in range(10)], "input": ["", "x"] * 5,
             "output": [f"done {i}" for i in range(10)], "text": [""] * 10})}),
    }

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return tables[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("source", ["hub", "auto"])  # auto: no mirror folder under local_dir
def test_hub_path_arguments(fake_hub, tmp_path, source):
    data = load_task_data(task_cfg("banking77", split_sizes=SMALL),
                          data_cfg("paper", tmp_path, source=source, general_mix_ratio=0.5))
    assert fake_hub == [("PolyAI/banking77", {"revision": "refs/convert/parquet"}),
                        ("tatsu-lab/alpaca", {"revision": None})]
    assert data.stats["source"] == "hub" and data.stats["general_source"] == "hub"
    assert data.labels == TOY_LABELS  # from the Hub ClassLabel, as label_names.json offline
    assert data.stats["general_rows"] == {"train": 2, "dev": 0, "test": 0}  # round(0.5 * 1) == 0


def test_hub_ids_and_revisions_in_the_task_yamls():
    expected = {"banking77": ("PolyAI/banking77", "refs/convert/parquet"), "dialogsum": ("knkarthick/dialogsum", None),
                "bitext": ("bitext/Bitext-customer-support-llm-chatbot-training-dataset", None)}
    for name, (hub_id, revision) in expected.items():
        cfg = task_cfg(name)
        assert (cfg.hub_id, cfg.hub_revision, cfg.mirror, cfg.name) == (hub_id, revision, name, name)
    assert data_cfg("cpu").general_hub_id == "tatsu-lab/alpaca"


# --- config plumbing ------------------------------------------------------------------------

def test_yaml_configs_match_the_schema():
    for name in TASK_NAMES:
        cfg = task_cfg(name)
        assert "{text}" in cfg.prompt_template and set(cfg.split_sizes) == {"train", "dev", "test"}
        assert cfg.metrics == (["rouge1", "rouge2", "rougeL", "rougeLsum"] if name == "dialogsum"
                               else ["precision", "recall", "f1_micro"])
    cpu, paper_ = data_cfg("cpu"), data_cfg("paper")
    assert (cpu.name, cpu.max_train, cpu.max_dev, cpu.max_test) == ("cpu", 160, 32, 100)
    assert (paper_.name, paper_.max_train, paper_.max_dev, paper_.max_test) == ("paper", None, None, None)


def test_hydra_style_node_with_root_interpolation_resolves():
    root = OmegaConf.create({"paths": {"data_dir": str(MIRRORS)},
                             "data": {"name": "cpu", "local_dir": "${paths.data_dir}", "max_train": 5}})
    assert as_schema(root.data, DataConfig).local_dir == str(MIRRORS)
    with pytest.raises(Exception, match="max_trian"):
        as_schema({"max_trian": 5}, DataConfig)
