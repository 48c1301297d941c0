"""One report: collect -> filter -> newest per (model, point, task) -> table, tests, plots."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptq_qlora.report import significance
from ptq_qlora.report.collect import (
    Collection, EvalRow, ReportError, collect_store, collect_wandb, filter_rows, keep_newest,
)
from ptq_qlora.report.table import PaperTable


@dataclass
class Report:
    rows: list[EvalRow]  # one per (model, point, task): what the table shows
    table: PaperTable
    per_example: list[dict]  # per-example paired tests
    cells: list[dict]  # across-cell tests (the paper's)
    collection: Collection  # everything read, with skipped/malformed folders
    notes: list[str] = field(default_factory=list)
    metric_for_generation: str = "rougeL"
    tasks: list[str] | None = None

    def markdown(self) -> str:
        return self.table.to_markdown()

    def significance_markdown(self) -> str:
        return significance.to_markdown(self.per_example, self.cells)

    def summary_lines(self) -> list[str]:
        c = self.collection
        lines = [f"read: {', '.join(c.where)}",
                 f"{len(c.rows)} completed evaluation(s); {len(self.rows)} shown; "
                 f"{len(c.skipped)} unfinished skipped; {len(c.malformed)} malformed"]
        lines += [f"skipped {p}: {why}" for p, why in c.skipped]
        lines += [f"malformed {p}: {why}" for p, why in c.malformed]
        return lines + self.notes


def build_report(
    store: str | Path | None = "runs",
    *,
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    lineage: str | None = None,
    metric_for_generation: str = "rougeL",
    wandb_project: str | None = None,
    wandb_filters: dict | None = None,
    wandb_api=None,
) -> Report:
    """Read `store` (and/or W&B `wandb_project`), keep the newest evaluation per (model, point,
    task) after the filters (`lineage`: a prefix of any lineage in the evaluated chain), and compute
    the table and tests. Raises ReportError when nothing can be reported (saying where it looked)."""
    if store is None and wandb_project is None:
        raise ReportError("nothing to read: give a run store (--store) or a W&B project (--wandb-project)")
    collection = Collection()
    if store is not None:
        collection.extend(collect_store(store))
    if wandb_project is not None:
        collection.extend(collect_wandb(wandb_project, filters=wandb_filters, api=wandb_api))
    if not collection.rows:
        skipped = f" ({len(collection.skipped)} unfinished, {len(collection.malformed)} malformed)" \
            if collection.skipped or collection.malformed else ""
        raise ReportError(f"no completed evaluations found in {', '.join(collection.where)}{skipped}")
    rows = filter_rows(collection.rows, tasks=tasks, models=models, lineage=lineage)
    if not rows:
        known = sorted({(r.model, r.task) for r in collection.rows})
        raise ReportError(
            f"no evaluation matches tasks={tasks} models={models} lineage={lineage!r} in "
            f"{', '.join(collection.where)}; available (model, task): {known}"
        )
    rows, notes = keep_newest(rows)
    notes = [*collection.notes, *notes]
    if any(r.model == "unknown" for r in rows):
        notes.append("model 'unknown': no SFT stage metadata (config.model.name) reachable from the evaluated "
                     "model's lineage in this store")
    table = PaperTable.from_rows(rows, tasks=tasks, models=models)
    per_example = significance.per_example_tests(rows, metric_for_generation)
    cells = significance.cell_tests(rows, metric_for_generation)
    return Report(rows, table, per_example, cells, collection, notes, metric_for_generation, tasks)


def write_report(report: Report, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """table.md/.csv, significance.md/.csv, notes.txt and PNGs under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "table.md": report.markdown() + "\n" + "".join(f"\n- {note}" for note in report.notes) + "\n",
        "table.csv": report.table.to_csv(),
        "significance.md": report.significance_markdown() + "\n",
        "significance.csv": significance.to_csv(report.per_example, report.cells),
        "notes.txt": "\n".join(report.summary_lines()) + "\n",
    }
    written = {}
    for name, text in files.items():
        (out / name).write_text(text)
        written[name] = out / name
    if plots:
        from ptq_qlora.report.plots import write_plots

        for path in write_plots(report.rows, out, report.metric_for_generation, report.tasks):
            written[path.name] = path
    return written
