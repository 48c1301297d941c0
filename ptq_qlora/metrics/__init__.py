"""Task metrics, chosen by kind through a registry that fails loudly on unknown kinds.

kinds: "classification" (precision/recall/F1-micro over a label set; needs `labels`)
       "generation"     (ROUGE-1/2/L/Lsum)
"""
from __future__ import annotations

from typing import Callable

from ..registry import Registry
from .classification import classification_metrics
from .labels import parse_label
from .rouge import rouge_metrics, sentence_splitter
from .significance import paired_wilcoxon

MetricFn = Callable[[list[str], list[str], "list[str] | None"], "tuple[dict, list[dict]]"]
METRICS: Registry[MetricFn] = Registry("metric kind")


@METRICS.register("classification")
def _classification(predictions, references, labels):
    if labels is None:
        raise ValueError("classification metrics need the task's label set (labels=...)")
    return classification_metrics(predictions, references, labels)


@METRICS.register("generation")
def _generation(predictions, references, labels):
    return rouge_metrics(predictions, references)


def compute_metrics(
    kind: str, predictions: list[str], references: list[str], labels: list[str] | None = None
) -> tuple[dict, list[dict]]:
    """(summary, per_example) for `kind`; KeyError listing the known kinds for an unknown one."""
    return METRICS.get(kind)(predictions, references, labels)


__all__ = [
    "METRICS",
    "classification_metrics",
    "compute_metrics",
    "paired_wilcoxon",
    "parse_label",
    "rouge_metrics",
    "sentence_splitter",
]
