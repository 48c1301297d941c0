"""Markdown tables of metrics: one row per evaluated model, one column per metric."""
from __future__ import annotations

from ptq_qlora.point_labels import parse as parse_label


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def format_table(results: dict[str, dict], metric_names: list[str], title: str | None = None) -> str:
    """`results` maps a row label to its metrics dict; missing metrics print as n/a."""
    header = ["model", *metric_names]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * len(metric_names)) + " |")
    for label, metrics in results.items():
        lines.append("| " + " | ".join([label] + [_cell(metrics.get(m)) for m in metric_names]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ the paper's Tables 2-3
# Rows: model x point. SFT-16bit first, then the PTQ points by method (the paper's BNB, GPTQ, then
# others), format variant (NF4 before FP4), bit width (2, 3, 4, 8), SFT-based before the no-SFT
# ablation, each PTQ point followed by its +QLoRA; base and other points last. The paper's five rows
# keep its order. Columns: per task its metrics (and a Bits column once one method has several widths).
POINT_ORDER = ("SFT-16bit", "PTQ-BNB-4bit", "PTQ-BNB-4bit+QLoRA", "PTQ-GPTQ-4bit", "PTQ-GPTQ-4bit+QLoRA")
METHOD_ORDER = ("BNB", "GPTQ")
TASK_ORDER = ("bitext", "banking77", "dialogsum")  # Table 3's column order
COLUMNS = {
    "classification": (("precision", "Precision"), ("recall", "Recall"), ("f1_micro", "F1-micro")),
    "generation": (("rouge1", "R1"), ("rouge2", "R2"), ("rougeL", "RL"), ("rougeLsum", "RLsum"),
                   ("alignscore", "AlScore")),
}
PRIMARY = {"classification": "f1_micro", "generation": "rougeL"}
NOT_APPLICABLE = "n/a"  # a metric this evaluation did not compute (AlignScore unless present)
NOT_EVALUATED = "-"  # this model/point was not evaluated on this task (empty in the CSV)
_BOOKKEEPING = {"n", "n_examples", "n_unparsed"}


def point_sort_key(label: str) -> tuple:
    if label == "SFT-16bit":
        return (0,)
    p = parse_label(label)
    if p.is_ptq:
        rank = METHOD_ORDER.index(p.method) if p.method in METHOD_ORDER else len(METHOD_ORDER)
        return (1, rank, p.method, p.variant or "", p.bits, int(p.no_sft), int(p.qlora), label)
    return (2, label)


def bit_widths_by_family(labels) -> dict[str, list[int]]:
    """PTQ method family (PTQ-GPTQ, PTQ-BNB-FP4, ...) -> the bit widths present among `labels`."""
    widths: dict[str, set] = {}
    for label in labels:
        p = parse_label(label)
        if p.is_ptq:
            widths.setdefault(p.family, set()).add(p.bits)
    return {family: sorted(bits) for family, bits in widths.items()}


def has_bits_axis(labels) -> bool:
    """True when some PTQ method was run at more than one bit width."""
    return any(len(bits) > 1 for bits in bit_widths_by_family(labels).values())


def ordered_tasks(tasks, wanted=None) -> list[str]:
    tasks = set(tasks)
    if wanted:
        return [t for t in wanted if t in tasks]
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def ordered_models(models, wanted=None) -> list[str]:
    models = set(models)
    if wanted:
        return [m for m in wanted if m in models]
    return sorted(models, key=lambda m: (m == "unknown", m))


def display_name(model: str, label: str) -> str:
    """The paper's row name: `Qwen2-7b + PTQ-BNB-4bit + QLoRA`."""
    return f"{model} + {label.replace('+QLoRA', ' + QLoRA')}"


class PaperTable:
    """`columns`: (task, metric key, title); `rows`: (model, label, {(task, key): value}), where a
    task the row was not evaluated on has no keys and a metric it lacks is None; `bits`: (model,
    label) -> weight bit width (None if unknown)."""

    def __init__(self, columns: list[tuple[str, str, str]], rows: list[tuple[str, str, dict]],
                 bits: dict[tuple[str, str], int | None] | None = None):
        self.columns, self.rows = columns, rows
        self.bits = bits or {}
        self.show_bits = has_bits_axis(label for _, label, _ in rows)

    @classmethod
    def from_rows(cls, eval_rows, tasks=None, models=None) -> "PaperTable":
        kinds: dict[str, str] = {}
        extra_keys: dict[str, set] = {}
        for r in eval_rows:
            kinds.setdefault(r.task, r.kind)
            extra_keys.setdefault(r.task, set()).update(k for k in r.metrics if k not in _BOOKKEEPING)
        columns = []
        for task in ordered_tasks(kinds, tasks):
            spec = COLUMNS.get(kinds[task]) or tuple((k, k) for k in sorted(extra_keys[task]))
            columns += [(task, key, title) for key, title in spec]
        cells: dict[tuple[str, str], dict] = {}
        bits: dict[tuple[str, str], int | None] = {}
        for r in eval_rows:
            row = cells.setdefault((r.model, r.label), {})
            bits[(r.model, r.label)] = r.bits if r.bits is not None else parse_label(r.label).bits
            for task, key, _ in columns:
                if task == r.task:
                    row[(task, key)] = r.metrics.get(key)
        order = {m: i for i, m in enumerate(ordered_models({m for m, _ in cells}, models))}
        keys = sorted((k for k in cells if k[0] in order), key=lambda k: (order[k[0]], point_sort_key(k[1])))
        return cls(columns, [(model, label, cells[(model, label)]) for model, label in keys], bits)

    def _bits(self, model: str, label: str) -> str:
        value = self.bits.get((model, label))
        return "" if value is None else str(value)

    def _cell(self, row: dict, task: str, key: str, digits: int) -> str:
        if not any(t == task for t, _ in row):
            return NOT_EVALUATED
        value = row.get((task, key))
        return NOT_APPLICABLE if value is None else f"{value:.{digits}f}"

    def to_markdown(self, digits: int = 4) -> str:
        lead = ["Models", "Bits"] if self.show_bits else ["Models"]
        header = [*lead, *(f"{task} {title}" for task, _, title in self.columns)]
        lines = ["| " + " | ".join(header) + " |",
                 "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
        for model, label, row in self.rows:
            cells = [self._cell(row, task, key, digits) for task, key, _ in self.columns]
            first = [display_name(model, label), *([self._bits(model, label)] if self.show_bits else [])]
            lines.append("| " + " | ".join([*first, *cells]) + " |")
        return "\n".join(lines)

    def records(self) -> list[dict]:
        """One dict per row: model, point, bits, with_sft (False for base and the no-SFT ablation),
        `<task>/<metric>` (float, "n/a", or "" if not evaluated)."""
        out = []
        for model, label, row in self.rows:
            with_sft = label != "base" and not parse_label(label).no_sft
            record = {"model": model, "point": label, "bits": self.bits.get((model, label)), "with_sft": with_sft}
            for task, key, _ in self.columns:
                evaluated = any(t == task for t, _ in row)
                value = row.get((task, key))
                record[f"{task}/{key}"] = "" if not evaluated else (NOT_APPLICABLE if value is None else value)
            out.append(record)
        return out

    def to_csv(self) -> str:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["model", "point", "bits", "with_sft",
                                                    *(f"{t}/{k}" for t, k, _ in self.columns)],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records())
        return buffer.getvalue()

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.records())
