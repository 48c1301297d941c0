"""Precision / recall / F1-micro for closed-label-set classification answered in free text."""
from __future__ import annotations

from sklearn.metrics import precision_recall_fscore_support

from .labels import parse_label

# Stands for "the answer named no label"; kept out of sklearn's `labels=` so it is never a positive.
_UNPARSED = "\x00<unparsed>"


def classification_metrics(
    predictions: list[str], references: list[str], labels: list[str]
) -> tuple[dict, list[dict]]:
    """Score free-text predictions against gold labels.

    Each prediction goes through `parse_label`; one that names no label ("unparsed") counts as wrong.

    Averaging: sklearn's `precision_recall_fscore_support(average="micro", labels=<label set>)`. Micro
    averaging over the label set counts true positives, false positives and false negatives over all
    classes together; an unparsed prediction is outside the label set, so it is a false negative for
    its gold class but no one's false positive. Hence
      recall    = correct / n                      (= accuracy)
      precision = correct / (n - n_unparsed)       (>= recall)
    When every prediction parses, as in the paper's Tables 2-3, precision = recall = F1-micro =
    accuracy, which is what the paper reports. A gap between precision and recall here measures
    format failures only.

    Returns (summary, per_example): summary has precision, recall, f1_micro, accuracy, n, n_unparsed;
    per_example has, for each input, `parsed` (label or None) and `correct` (0/1).
    Raises ValueError on length mismatch, no examples, or a reference outside `labels`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    label_set = set(labels)
    outside = sorted({ref for ref in references if ref not in label_set})
    if outside:
        raise ValueError(f"references outside the label set: {outside}")

    parsed = [parse_label(prediction, labels) for prediction in predictions]
    per_example = [
        {"parsed": label, "correct": int(label == ref)} for label, ref in zip(parsed, references)
    ]
    y_pred = [_UNPARSED if label is None else label for label in parsed]
    precision, recall, f1, _ = precision_recall_fscore_support(
        references, y_pred, labels=list(labels), average="micro", zero_division=0
    )
    n_correct = sum(row["correct"] for row in per_example)
    summary = {
        "precision": float(precision),
        "recall": float(recall),
        "f1_micro": float(f1),
        "accuracy": n_correct / len(references),
        "n": len(references),
        "n_unparsed": sum(label is None for label in parsed),
    }
    return summary, per_example
