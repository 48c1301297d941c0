"""`python eval.py report --store runs/ --out reports/<name>/ [...]`: the paper's Table 2/3 layout,
Wilcoxon tests and plots from a run store (and/or W&B). See `--help`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ptq_qlora.report.collect import ReportError

GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python eval.py report",
        description="Tables (paper Table 2/3 layout), Wilcoxon signed-rank tests and plots from completed "
                    "evaluations. Writes table.md/.csv, significance.md/.csv, notes.txt and PNGs to --out "
                    "and prints the Markdown table.",
    )
    p.add_argument("--store", default=None,
                   help="run store to read eval-*/ folders from (default: $PTQ_QLORA_STORE, else ./runs)")
    p.add_argument("--out", default="reports/default", help="output folder (default: reports/default)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks, in this column order")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="only these models (config names), in this row order")
    p.add_argument("--lineage", metavar="PREFIX",
                   help="only evaluations whose chain (eval, model, parents) has a lineage starting with PREFIX")
    p.add_argument("--metric-for-generation", default="rougeL", choices=GENERATION_METRICS,
                   help="per-example score and primary metric for generation tasks (default: rougeL)")
    p.add_argument("--wandb-project", metavar="[ENTITY/]PROJECT",
                   help="also read eval/<point>/* summaries of finished W&B runs (needs network and a key)")
    p.add_argument("--wandb-filters", metavar="JSON",
                   help='MongoDB-style run filters, e.g. \'{"tags": "task:bitext"}\'')
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    from ptq_qlora.report.build import build_report, write_report

    store = args.store or os.environ.get("PTQ_QLORA_STORE") or "runs"
    if args.store is None and args.wandb_project and not Path(store).is_dir():
        store = None  # W&B only
    try:
        filters = json.loads(args.wandb_filters) if args.wandb_filters else None
        report = build_report(
            store, tasks=args.tasks, models=args.models, lineage=args.lineage,
            metric_for_generation=args.metric_for_generation,
            wandb_project=args.wandb_project, wandb_filters=filters,
        )
        written = write_report(report, args.out, plots=not args.no_plots)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"error: --wandb-filters is not valid JSON: {err}", file=sys.stderr)
        return 2
    print(report.markdown())
    if not args.quiet:
        print()
        for line in report.summary_lines():
            print(line)
        print(f"wrote {len(written)} file(s) to {Path(args.out).resolve()}: {', '.join(sorted(written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
