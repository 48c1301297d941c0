"""Markdown tables of metrics: one row per evaluated model, one column per metric."""
from __future__ import annotations


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
