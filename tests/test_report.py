"""Reports: collecting eval folders, the paper's table layout, Wilcoxon tests, plots and the CLI,
on synthetic run stores written in the real on-disk layout (ptq_qlora.report.synthetic)."""
import csv
import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from ptq_qlora.report import build_report, write_report
from ptq_qlora.report.cli import main as report_main
from ptq_qlora.report.collect import EvalRow, ReportError, collect_store, collect_wandb, keep_newest
from ptq_qlora.report.significance import (
    cell_tests, exact_wilcoxon_p, per_example_tests, wilcoxon_summary,
)
from ptq_qlora.report.synthetic import build_synthetic_store, ref, write_chain, write_eval
from ptq_qlora.report.table import PaperTable

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tmp_path):
    return build_synthetic_store(tmp_path / "runs")


# ----------------------------------------------------------------------------------- collect
def test_collect_reads_completed_folders_and_skips_unfinished(store):
    found = collect_store(store.root)
    assert len(found.rows) == 2 * 2 * 6 + 1  # models x tasks x points, + one older duplicate
    skipped = sorted(Path(p).name for p, _ in found.skipped)
    assert skipped == sorted(p.name for p in store.unfinished)
    assert [Path(p).name for p, _ in found.malformed] == [store.malformed[0].name]
    assert {r.model for r in found.rows} == {"smollm2-135m", "tiny-random"}  # base included, via its SFT
    row = next(r for r in found.rows if (r.model, r.label, r.task) == ("tiny-random", "PTQ-GPTQ-4bit+QLoRA", "bitext"))
    assert (row.point, row.method, row.kind) == ("qlora", "gptq", "classification")
    assert row.predictions is not None and row.predictions.exists()
    # the chain reaches the SFT lineage, so a --lineage prefix of the SFT selects its whole family
    sft_lineage = store.refs["tiny-random"]["SFT-16bit"]["lineage"]
    assert sft_lineage in row.chain


def test_model_name_unknown_without_upstream_metadata(tmp_path):
    write_eval(tmp_path, ref("qlora", "PTQ-BNB-4bit+QLoRA", "deadbeefdeadbeef", {"method": "bnb", "bits": 4}),
               "bitext", [{"id": "a", "correct": 1}])
    report = build_report(tmp_path)
    assert [r.model for r in report.rows] == ["unknown"]
    assert any("unknown" in note for note in report.notes)


def test_label_follows_quantizer_bits(tmp_path):
    quantizer = {"method": "gptq", "label": "PTQ-GPTQ-4bit", "bits": 3}
    write_eval(tmp_path, ref("ptq", "PTQ-GPTQ-4bit", "0123456789abcdef", quantizer), "bitext",
               [{"id": "a", "correct": 1}])
    report = build_report(tmp_path)
    assert report.rows[0].label == "PTQ-GPTQ-3bit"
    assert any("bits=3" in note for note in report.notes)


# ----------------------------------------------------------------------------------- newest wins
def test_newest_evaluation_wins_and_lineage_filter_selects_another(store):
    report = build_report(store.root)
    shown = {(r.model, r.label, r.task): r for r in report.rows}
    assert len(shown) == len(report.rows) == 24
    kept = shown[("smollm2-135m", "SFT-16bit", "bitext")]
    assert Path(kept.source) == store.evals[("smollm2-135m", "SFT-16bit", "bitext")]
    old = store.superseded[0].name
    assert any(old in note and "newest" in note for note in report.notes)
    assert "smollm2-135m: synthetic smollm2-135m" in report.notes  # the model config's caveat
    only_old = build_report(store.root, lineage="0ld0ld")
    assert [Path(r.source).name for r in only_old.rows] == [old]


def test_keep_newest_orders_by_finished_at():
    rows = [EvalRow("m", "SFT-16bit", "bitext", "classification", {"f1_micro": v}, lineage=lin, finished_at=t)
            for v, lin, t in [(0.1, "a", 30.0), (0.2, "b", 10.0), (0.3, "c", None)]]
    kept, notes = keep_newest(rows)
    assert [r.lineage for r in kept] == ["a"] and len(notes) == 1


# ----------------------------------------------------------------------------------- table
POINTS = ["SFT-16bit", "PTQ-BNB-4bit", "PTQ-BNB-4bit+QLoRA", "PTQ-GPTQ-4bit", "PTQ-GPTQ-4bit+QLoRA"]


def test_table_rows_follow_the_paper_order(store):
    table = build_report(store.root).table
    assert [(m, l) for m, l, _ in table.rows] == [
        (m, l) for m in ("smollm2-135m", "tiny-random") for l in [*POINTS, "base"]]
    md = table.to_markdown().splitlines()
    assert md[0].startswith("| Models | bitext Precision | bitext Recall | bitext F1-micro | dialogsum R1 |")
    assert md[0].rstrip(" |").endswith("dialogsum AlScore")
    assert md[4].startswith("| smollm2-135m + PTQ-BNB-4bit + QLoRA |")


def test_table_values_na_and_missing_rows():
    rows = [
        EvalRow("m", "PTQ-GPTQ-3bit", "bitext", "classification",
                {"precision": 0.5, "recall": 0.25, "f1_micro": 1 / 3}),
        EvalRow("m", "PTQ-BNB-4bit+QLoRA", "bitext", "classification",
                {"precision": 0.9, "recall": 0.9, "f1_micro": 0.9}),
        EvalRow("m", "SFT-16bit", "dialogsum", "generation",
                {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.4, "rougeLsum": 0.41}),
        EvalRow("m", "PTQ-BNB-4bit+QLoRA", "dialogsum", "generation",
                {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.4, "rougeLsum": 0.41, "alignscore": 0.88}),
    ]
    table = PaperTable.from_rows(rows)
    assert [l for _, l, _ in table.rows] == ["SFT-16bit", "PTQ-BNB-4bit+QLoRA", "PTQ-GPTQ-3bit"]  # missing omitted
    md = table.to_markdown().splitlines()
    assert md[2] == "| m + SFT-16bit | - | - | - | 0.5000 | 0.2500 | 0.4000 | 0.4100 | n/a |"
    assert md[3] == ("| m + PTQ-BNB-4bit + QLoRA | 0.9000 | 0.9000 | 0.9000 | 0.5000 | 0.2500 | 0.4000 | 0.4100 "
                     "| 0.8800 |")
    assert md[4] == "| m + PTQ-GPTQ-3bit | 0.5000 | 0.2500 | 0.3333 | - | - | - | - | - |"
    records = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert records[0]["dialogsum/alignscore"] == "n/a" and records[0]["bitext/f1_micro"] == ""
    assert float(records[1]["dialogsum/alignscore"]) == 0.88


def test_task_and_model_filters_set_order(store):
    report = build_report(store.root, tasks=["dialogsum", "bitext"], models=["tiny-random"])
    assert {m for m, _, _ in report.table.rows} == {"tiny-random"}
    assert [t for t, _, _ in report.table.columns][0] == "dialogsum"


# ----------------------------------------------------------------------------------- Wilcoxon
def _chain_store(tmp_path, ptq_rows, qlora_rows, task="bitext", sft_rows=None):
    refs = write_chain(tmp_path, "m", methods=("bnb",))
    write_eval(tmp_path, refs["PTQ-BNB-4bit"], task, ptq_rows)
    write_eval(tmp_path, refs["PTQ-BNB-4bit+QLoRA"], task, qlora_rows)
    if sft_rows is not None:
        write_eval(tmp_path, refs["SFT-16bit"], task, sft_rows)
    return build_report(tmp_path)


def test_per_example_classification_by_hand(tmp_path):
    # QLoRA fixes 9 of PTQ's errors and breaks nothing; 3 examples right in both.
    ptq = [{"id": f"x{i}", "correct": int(i >= 9)} for i in range(12)]
    qlora = [{"id": f"x{i}", "correct": 1} for i in reversed(range(12))]  # other order: paired by id
    sft = [{"id": f"x{i}", "correct": int(i % 2)} for i in range(12)]
    report = _chain_store(tmp_path, ptq, qlora, sft_rows=sft)
    test = next(t for t in report.per_example if t["a"] == "PTQ-BNB-4bit+QLoRA" and t["b"] == "PTQ-BNB-4bit")
    # 9 non-zero differences, all +1: W = sum of negative ranks = 0; exact two-sided p = 2 / 2**9
    assert (test["n"], test["n_nonzero"], test["statistic"]) == (12, 9, 0.0)
    assert test["mean_difference"] == pytest.approx(9 / 12)
    assert test["p_value"] == pytest.approx(2 / 2 ** 9) and test["p_exact"] == pytest.approx(2 / 2 ** 9)
    assert test["significant"] and test["metric"] == "correct"
    assert {(t["a"], t["b"]) for t in report.per_example} == {
        ("PTQ-BNB-4bit+QLoRA", "PTQ-BNB-4bit"), ("PTQ-BNB-4bit+QLoRA", "SFT-16bit"), ("PTQ-BNB-4bit", "SFT-16bit")}
    vs_sft = next(t for t in report.per_example if t["a"] == "PTQ-BNB-4bit+QLoRA" and t["b"] == "SFT-16bit")
    # QLoRA right everywhere, SFT wrong on the 6 even ids: 6 x (+1): p = 2 / 2**6
    assert vs_sft["n_nonzero"] == 6 and vs_sft["p_exact"] == pytest.approx(2 / 2 ** 6)


def test_per_example_generation_matches_scipy_on_the_same_pairs(tmp_path):
    rng = random.Random(3)
    scores = {f"d{i}": (rng.random(), rng.random()) for i in range(30)}

    def rows(j, ids):
        return [{"id": i, "rouge1": 0.5, "rouge2": 0.5, "rougeL": scores[i][j], "rougeLsum": 0.5} for i in ids]

    ids = list(scores)
    report = _chain_store(tmp_path, rows(0, ids), rows(1, ids[::-1]), task="dialogsum")  # other order: by id
    (test,) = report.per_example
    expected = wilcoxon([scores[i][1] for i in ids], [scores[i][0] for i in ids])
    assert test["metric"] == "rougeL" and test["n"] == 30
    assert test["statistic"] == pytest.approx(expected.statistic)
    assert test["p_value"] == pytest.approx(expected.pvalue)
    rouge1 = per_example_tests(report.rows, metric_for_generation="rouge1")[0]
    assert rouge1["metric"] == "rouge1" and rouge1["n_nonzero"] == 0 and rouge1["p_value"] == 1.0


def test_unmatched_ids_are_left_out_and_said(tmp_path):
    ptq = [{"id": f"x{i}", "correct": 0} for i in range(8)]
    qlora = [{"id": f"x{i}", "correct": 1} for i in range(2, 10)]
    (test, *_) = _chain_store(tmp_path, ptq, qlora).per_example
    assert test["n"] == 6 and "4 id(s) only on one side" in test["note"]


def _cell_rows(pairs, kind="classification"):
    metric, task = ("f1_micro", "bitext") if kind == "classification" else ("rougeL", "dialogsum")
    rows = []
    for i, (ptq, qlora) in enumerate(pairs):
        rows.append(EvalRow(f"m{i}", "PTQ-BNB-4bit", task, kind, {metric: ptq}))
        rows.append(EvalRow(f"m{i}", "PTQ-BNB-4bit+QLoRA", task, kind, {metric: qlora}))
    return rows


def test_cell_level_test_pairs_primary_metrics_across_cells():
    pairs = [(0.80, 0.86), (0.70, 0.69), (0.50, 0.61), (0.90, 0.97), (0.60, 0.64), (0.75, 0.83), (0.55, 0.60)]
    (test,) = [t for t in cell_tests(_cell_rows(pairs)) if t["metric"] == "f1_micro"]
    expected = wilcoxon([q for _, q in pairs], [p for p, _ in pairs])
    assert (test["a"], test["b"], test["n"]) == ("PTQ+QLoRA", "PTQ", 7)
    assert test["mean_difference"] == pytest.approx(sum(q - p for p, q in pairs) / 7)
    # differences +.06 -.01 +.11 +.07 +.04 +.08 +.05: the only negative one has rank 1 -> W = 1
    assert test["statistic"] == pytest.approx(1.0) == pytest.approx(expected.statistic)
    assert test["p_value"] == pytest.approx(expected.pvalue) == pytest.approx(4 / 128)
    assert test["significant"] and test["note"] == ""


def test_cell_level_small_n_is_flagged():
    (test,) = cell_tests(_cell_rows([(0.5, 0.6), (0.4, 0.5), (0.3, 0.35), (0.2, 0.4), (0.1, 0.3)]))
    assert test["p_value"] == pytest.approx(2 / 2 ** 5) and not test["significant"]
    assert "cannot reach p <= 0.05 below 6" in test["note"]


def test_small_sample_claim_holds_in_scipy():
    """Two-sided exact Wilcoxon: the smallest p with n non-zero pairs is 2 / 2**n, so p <= 0.05
    needs n >= 6 (0.0625 at 5, 0.03125 at 6)."""
    for n in range(1, 9):
        d = [1.0 + 0.1 * i for i in range(n)]  # all positive, no ties: the most extreme outcome
        p = wilcoxon(d, method="exact").pvalue
        assert p == pytest.approx(2 / 2 ** n) == pytest.approx(exact_wilcoxon_p(d))
        assert (p <= 0.05) == (n >= 6)


def test_exact_p_agrees_with_scipy():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 12)
        d = [rng.choice([-1, 1]) * (0.1 + rng.random()) for _ in range(n)]  # no ties: scipy exact
        assert exact_wilcoxon_p(d) == pytest.approx(wilcoxon(d, method="exact").pvalue)
        tied = [rng.choice([-2, -1, 1, 1, 2, 3]) for _ in range(n)]  # ties, n <= 13: scipy enumerates too
        if any(tied):
            assert exact_wilcoxon_p(tied) == pytest.approx(wilcoxon(tied).pvalue)


def test_few_nonzero_pairs_get_the_exact_p():
    # 4 of 20 pairs differ: scipy's normal approximation over all 20 pairs would say p ~ 0.046;
    # paired_wilcoxon tests the non-zero differences exactly, and p_exact (enumeration) agrees
    result = wilcoxon_summary([1] * 4 + [0] * 16, [0] * 20)
    assert result["p_value"] == pytest.approx(0.125)
    assert result["p_exact"] == pytest.approx(0.125) and not result["significant"]


# ----------------------------------------------------------------------------------- files, CLI
def test_write_report_files_and_plots(store, tmp_path):
    written = write_report(build_report(store.root), tmp_path / "rep")
    for name in ("table.md", "table.csv", "significance.md", "significance.csv", "notes.txt",
                 "bars_bitext.png", "bars_dialogsum.png", "pair_smollm2-135m_bitext_PTQ-BNB-4bit.png"):
        assert name in written and written[name].exists(), name
    assert written["bars_bitext.png"].read_bytes().startswith(PNG)
    rows = list(csv.DictReader(open(written["significance.csv"])))
    assert {r["level"] for r in rows} == {"per-example", "cells"}
    assert "### Across model × task cells" in written["significance.md"].read_text()


def test_cli_end_to_end_through_eval_py(store, tmp_path):
    out = tmp_path / "reports" / "syn"
    proc = subprocess.run([sys.executable, "eval.py", "report", "--store", str(store.root), "--out", str(out),
                           "--tasks", "bitext", "--no-plots"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| smollm2-135m + PTQ-BNB-4bit + QLoRA |" in proc.stdout
    assert (out / "table.md").read_text().startswith("| Models | bitext Precision")
    assert "dialogsum" not in (out / "table.csv").read_text()
    assert not list(out.glob("*.png"))


def test_cli_in_process_writes_files_and_prints_table(store, tmp_path, capsys):
    assert report_main(["--store", str(store.root), "--out", str(tmp_path / "o"), "--metric-for-generation",
                        "rougeLsum", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Models |") and (tmp_path / "o" / "bars_dialogsum.png").exists()
    assert "rougeLsum" in (tmp_path / "o" / "significance.md").read_text()


def test_eval_py_dispatches_report_before_hydra(monkeypatch, capsys):
    from ptq_qlora.cli import evaluate

    monkeypatch.setattr(sys, "argv", ["eval.py", "report", "--help"])
    with pytest.raises(SystemExit) as exc:
        evaluate.main()
    assert exc.value.code == 0
    assert "python eval.py report" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report_main(["--store", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"run store not found: {missing}" in capsys.readouterr().err

    empty = tmp_path / "empty"
    write_eval(empty, ref("sft", "SFT-16bit", "abc"), "bitext", [{"id": "a", "correct": 1}], partial=True)
    assert report_main(["--store", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no completed evaluations found in" in err and str(empty) in err and "1 unfinished" in err
    with pytest.raises(ReportError, match="no evaluation matches"):
        build_report(_one_eval(tmp_path / "one"), tasks=["banking77"])


def _one_eval(root):
    write_eval(root, ref("sft", "SFT-16bit", "abc"), "bitext", [{"id": "a", "correct": 1}])
    return root


# ----------------------------------------------------------------------------------- W&B
class _FakeRun:
    def __init__(self, run_id, config, summary, state="finished"):
        self.id, self.path, self.state = run_id, ["ent", "proj", run_id], state
        self.config, self.summary = config, summary


class _FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return iter(self._runs)


def test_wandb_rows_from_fake_api(store):
    eval_folder = store.evals[("smollm2-135m", "PTQ-GPTQ-4bit+QLoRA", "bitext")]
    config = {"model": {"name": "qwen2-7b"}, "task": {"name": "bitext"},
              "quantizer": {"name": "bnb-nf4", "method": "bnb", "label": "PTQ-BNB-4bit", "bits": 4},
              "stages": {"eval-qlora": {"artifact": f"{eval_folder.name}", "path": str(eval_folder)}}}
    summary = {"eval/sft/f1_micro": 0.9, "eval/sft/precision": 0.9, "eval/sft/recall": 0.9, "eval/sft/reused": 1,
               "eval/ptq/f1_micro": 0.8, "eval/qlora/f1_micro": 0.95, "eval/qlora/predictions": {"_type": "table"},
               "sft/train/loss": 1.0, "_timestamp": 1.8e9}
    api = _FakeApi([_FakeRun("r1", config, summary), _FakeRun("r2", config, summary, state="running")])
    found = collect_wandb("ent/proj", filters={"tags": "task:bitext"}, api=api)
    assert api.calls == [("ent/proj", {"tags": "task:bitext"})]
    assert [s for _, s in found.skipped] == ["run state 'running'"]
    rows = {r.point: r for r in found.rows}
    assert rows["sft"].label == "SFT-16bit"
    assert rows["sft"].metrics == {"f1_micro": 0.9, "precision": 0.9, "recall": 0.9}
    assert rows["ptq"].label == "PTQ-BNB-4bit" and rows["ptq"].model == "qwen2-7b"
    # the eval folder named in config.stages exists here: its label and predictions are used
    assert rows["qlora"].label == "PTQ-GPTQ-4bit+QLoRA" and rows["qlora"].predictions is not None
    assert rows["qlora"].lineage == eval_folder.name.removeprefix("eval-")
    report = build_report(None, wandb_project="ent/proj", wandb_api=_FakeApi([_FakeRun("r1", config, summary)]))
    assert [l for _, l, _ in report.table.rows] == ["SFT-16bit", "PTQ-BNB-4bit", "PTQ-GPTQ-4bit+QLoRA"]


def test_wandb_flat_config_and_failure():
    config = {"model.name": "m", "task.name": "dialogsum", "quantizer.label": "PTQ-GPTQ-4bit", "quantizer.bits": 3}
    rows = collect_wandb("p", api=_FakeApi([_FakeRun("r", config, {"eval/qlora/rougeL": 0.4})])).rows
    assert [(r.model, r.label, r.kind) for r in rows] == [("m", "PTQ-GPTQ-3bit+QLoRA", "generation")]

    class Broken:
        def runs(self, *a, **k):
            raise ConnectionError("offline")

    with pytest.raises(ReportError, match="W&B query of project 'p' failed: offline"):
        collect_wandb("p", api=Broken())
