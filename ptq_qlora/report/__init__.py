"""Reports over completed evaluations: the paper's Table 2/3 layout, Wilcoxon signed-rank tests
(per example and across model x task cells), plots; from a run store or W&B.

    from ptq_qlora.report import build_report, write_report
    report = build_report("runs", tasks=["bitext"])
    print(report.markdown()); write_report(report, "reports/x")

CLI: `python eval.py report --help`. Names are loaded lazily: the training runner imports
`ptq_qlora.report.table` and must not pay for pandas/matplotlib/scipy.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_report": "build", "write_report": "build", "Report": "build",
    "collect_store": "collect", "collect_wandb": "collect", "keep_newest": "collect", "filter_rows": "collect",
    "EvalRow": "collect", "Collection": "collect", "ReportError": "collect",
    "PaperTable": "table", "format_table": "table",
    "per_example_tests": "significance", "cell_tests": "significance", "wilcoxon_summary": "significance",
    "exact_wilcoxon_p": "significance",
    "write_plots": "plots", "plot_task_bars": "plots", "plot_pair": "plots", "plot_bits": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ptq_qlora.report' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ptq_qlora.report.{_EXPORTS[name]}"), name)
