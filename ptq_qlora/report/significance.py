"""Wilcoxon signed-rank tests between the chain's points (paper section 4.3, p <= 0.05).

Two levels:
- per example: two evaluations of the same model and task, paired by example `id` (classification:
  `correct` 0/1; generation: ROUGE-L by default, and AlignScore too where both evaluations have it);
- across cells, as the paper did: the cell-level primary metric (F1-micro / ROUGE-L, and the other
  ROUGE scores) of PTQ vs PTQ+QLoRA paired over every (model, task, PTQ method) cell available.

Comparisons: PTQ+QLoRA vs PTQ, PTQ+QLoRA vs SFT-16bit, PTQ vs SFT-16bit (the paper tests all three);
for the no-SFT ablation also its PTQ+QLoRA and PTQ vs those of SFT -> PTQ -> QLoRA (SFT→PTQ+QLoRA,
SFT→PTQ) with the same quantizer; across cells the ablation is tested apart from the paper's cells.
`mean_difference` is mean(A - B), so a positive value favours A.

Small samples: with fewer than 6 non-zero pairs the exact two-sided test cannot reach p <= 0.05
(its smallest p is 2 / 2**n: 0.0625 at n = 5, 0.03125 at n = 6). scipy switches to a normal
approximation when there are zeros or ties and more than 13 pairs in all, which overstates
significance when few pairs differ (4 non-zero out of 20 gives p ~ 0.045 where the exact p is
0.125); so whenever 1..13 pairs are non-zero `p_exact` is computed by full enumeration of the sign
assignments and `significant` uses it.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from ptq_qlora.metrics.significance import paired_wilcoxon
from ptq_qlora.report.collect import EvalRow
from ptq_qlora.point_labels import parse as parse_label
from ptq_qlora.point_labels import qlora_label
from ptq_qlora.report.table import COLUMNS, PRIMARY, ordered_models, ordered_tasks, point_sort_key

ALPHA = 0.05
MIN_PAIRS_FOR_ALPHA = 6  # fewest non-zero pairs with which a two-sided exact test reaches p <= 0.05
EXACT_UP_TO = 13  # non-zero pairs enumerated exactly (2**13 sign assignments)
COMPARISONS = (("PTQ+QLoRA", "PTQ"), ("PTQ+QLoRA", "SFT-16bit"), ("PTQ", "SFT-16bit"),
               # the no-SFT ablation against the paper's recipe (absent, so skipped, for SFT-based sets)
               ("PTQ+QLoRA", "SFT→PTQ+QLoRA"), ("PTQ", "SFT→PTQ"))
SFT = "SFT-16bit"
ALIGNSCORE = "alignscore"  # per-example key in predictions.jsonl when the eval scored it


# ------------------------------------------------------------------------------------ the test
def exact_wilcoxon_p(differences: list[float]) -> float:
    """Two-sided exact p of the signed-rank statistic over the non-zero differences (zeros dropped,
    ties given average ranks), enumerating all 2**n sign assignments: min(1, 2 min(P(T+ <= t),
    P(T+ >= t))). Equals scipy's exact p without ties; with ties it is the exact permutation p."""
    d = [x for x in differences if x != 0]
    n = len(d)
    if n == 0:
        return 1.0
    if n > 20:
        raise ValueError(f"exact enumeration is for small samples (got {n} non-zero pairs)")
    ranks = _average_ranks([abs(x) for x in d])
    observed = sum(r for r, x in zip(ranks, d) if x > 0)
    eps = 1e-9 * max(1.0, sum(ranks))
    low = high = 0
    for signs in itertools.product((0, 1), repeat=n):
        t = sum(r for r, s in zip(ranks, signs) if s)
        low += t <= observed + eps
        high += t >= observed - eps
    total = 2 ** n
    return min(1.0, 2 * min(low, high) / total)


def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_summary(scores_a: list[float], scores_b: list[float]) -> dict:
    """`paired_wilcoxon` plus means, `p_exact` (1..13 non-zero pairs), `significant` and notes."""
    result = paired_wilcoxon(scores_a, scores_b)
    n_nonzero = result["n_nonzero"]
    notes = [result["note"]] if result.get("note") else []
    p_exact = None
    if 0 < n_nonzero <= EXACT_UP_TO:
        p_exact = exact_wilcoxon_p([float(a) - float(b) for a, b in zip(scores_a, scores_b)])
        if not math.isclose(p_exact, result["p_value"], rel_tol=1e-6, abs_tol=1e-12):
            notes.append("p is scipy's normal approximation (zeros/ties); p_exact enumerates the signs")
    if 0 < n_nonzero < MIN_PAIRS_FOR_ALPHA:
        notes.append(
            f"only {n_nonzero} non-zero pair(s): the exact two-sided test cannot reach p <= {ALPHA} below "
            f"{MIN_PAIRS_FOR_ALPHA} (smallest possible p = {2 / 2 ** n_nonzero:.4g})"
        )
    p_used = p_exact if p_exact is not None else result["p_value"]
    return {
        "n": result["n"],
        "n_nonzero": n_nonzero,
        "mean_a": sum(map(float, scores_a)) / len(scores_a),
        "mean_b": sum(map(float, scores_b)) / len(scores_b),
        "mean_difference": result["mean_difference"],
        "statistic": result["statistic"],
        "p_value": result["p_value"],
        "p_exact": p_exact,
        "significant": bool(p_used <= ALPHA),
        "note": "; ".join(notes),
    }


# ------------------------------------------------------------------------------------ grouping
def comparison_sets(rows: list[EvalRow]) -> list[dict]:
    """For every (model, task, PTQ label): {"model", "task", "kind", "method", "no_sft", "PTQ",
    "PTQ+QLoRA", "SFT-16bit", "SFT→PTQ", "SFT→PTQ+QLoRA"} (rows or None). A PTQ point pairs with its
    QLoRA point of the same model and task; a no-SFT set also holds the SFT-based points of the same
    quantizer (for the ablation's comparisons), an SFT-based set has None there."""
    by_cell: dict[tuple, dict[str, EvalRow]] = {}
    for r in rows:
        by_cell.setdefault((r.model, r.task), {})[r.label] = r
    sets = []
    for model in ordered_models({m for m, _ in by_cell}):
        for task in ordered_tasks({t for m, t in by_cell if m == model}):
            labels = by_cell[(model, task)]
            parsed = [parse_label(label) for label in labels]
            ptq_labels = sorted({p.ptq for p in parsed if p.is_ptq or p.core.startswith("PTQ-")}, key=point_sort_key)
            for ptq in ptq_labels:
                point = parse_label(ptq)
                qlora = qlora_label(ptq)
                any_row = labels.get(ptq) or labels.get(qlora)
                sets.append({"model": model, "task": task, "kind": any_row.kind, "method": ptq,
                             "no_sft": point.no_sft, "PTQ": labels.get(ptq), "PTQ+QLoRA": labels.get(qlora),
                             "SFT-16bit": labels.get(SFT),
                             "SFT→PTQ": labels.get(point.core) if point.no_sft else None,
                             "SFT→PTQ+QLoRA": labels.get(qlora_label(point.core)) if point.no_sft else None})
    return sets


def per_example_key(kind: str, metric_for_generation: str = "rougeL") -> str | None:
    return {"classification": "correct", "generation": metric_for_generation}.get(kind)


def load_scores(path: Path, key: str) -> dict:
    """id -> per-example score from predictions.jsonl; a missing key is an error (says which)."""
    scores = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if key not in row:
                raise KeyError(f"{path}: line {line_no} has no per-example score {key!r} (has {sorted(row)})")
            scores.setdefault(row["id"], float(row[key]))
    return scores


def aligned_scores(a: EvalRow, b: EvalRow, key: str) -> tuple[list, list[float], list[float], int]:
    """(ids, scores of a, scores of b, unmatched count) over the ids both evaluated."""
    sa, sb = load_scores(a.predictions, key), load_scores(b.predictions, key)
    ids = [i for i in sa if i in sb]
    return ids, [sa[i] for i in ids], [sb[i] for i in ids], len(set(sa) ^ set(sb))


# ------------------------------------------------------------------------------------ tests
def per_example_keys(kind: str, a: EvalRow, b: EvalRow, metric_for_generation: str = "rougeL") -> list[str]:
    """The per-example scores to test: the kind's own, plus AlignScore when both sides computed it."""
    key = per_example_key(kind, metric_for_generation)
    if key is None:
        return []
    extra = [ALIGNSCORE] if kind == "generation" and key != ALIGNSCORE and all(
        ALIGNSCORE in r.metrics for r in (a, b)) else []
    return [key, *extra]


def per_example_tests(rows: list[EvalRow], metric_for_generation: str = "rougeL") -> list[dict]:
    out = []
    for group in comparison_sets(rows):
        for a_name, b_name in COMPARISONS:
            a, b = group[a_name], group[b_name]
            if a is None or b is None:
                continue
            for key in per_example_keys(group["kind"], a, b, metric_for_generation):
                out.append(_per_example_test(group, a, b, key))
    return out


def _per_example_test(group: dict, a: EvalRow, b: EvalRow, key: str) -> dict:
    record = {"level": "per-example", "model": group["model"], "task": group["task"],
              "method": group["method"], "a": a.label, "b": b.label, "metric": key}
    if a.predictions is None or b.predictions is None:
        return {**record, "note": "no predictions.jsonl for one side"}
    try:
        ids, sa, sb, unmatched = aligned_scores(a, b, key)
        if not ids:
            raise ValueError("no example ids in common")
        result = wilcoxon_summary(sa, sb)
    except (OSError, ValueError, KeyError) as err:
        return {**record, "note": f"not tested: {err}"}
    if unmatched:
        left_out = f"{unmatched} id(s) only on one side, left out"
        result["note"] = "; ".join(filter(None, [left_out, result["note"]]))
    return {**record, **result}


def cell_metrics(kind: str, metric_for_generation: str = "rougeL") -> list[str]:
    """The primary metric first, then (generation) the other ROUGE scores and AlignScore."""
    if kind == "generation":
        rest = [k for k, _ in COLUMNS["generation"] if k != metric_for_generation]
        return [metric_for_generation, *rest]
    return [PRIMARY[kind]] if kind in PRIMARY else []


def cell_tests(rows: list[EvalRow], metric_for_generation: str = "rougeL") -> list[dict]:
    """Across (model, task, method) cells of one task kind, as in the paper's section 4.3."""
    sets = comparison_sets(rows)
    out = []
    # the paper's test over SFT-based cells; the no-SFT ablation's cells are tested on their own
    for kind, no_sft in itertools.product(("classification", "generation"), (False, True)):
        kind_sets = [s for s in sets if s["kind"] == kind and s["no_sft"] == no_sft]
        if not kind_sets:
            continue
        for a_name, b_name in COMPARISONS:
            for metric in cell_metrics(kind, metric_for_generation):
                pairs = [(s[a_name].metrics[metric], s[b_name].metrics[metric], s) for s in kind_sets
                         if s[a_name] is not None and s[b_name] is not None
                         and metric in s[a_name].metrics and metric in s[b_name].metrics]
                if not pairs:
                    continue
                tasks = f"{kind} tasks" + (" (no SFT)" if no_sft else "")
                record = {"level": "cells", "model": "all", "task": tasks, "method": "all",
                          "a": a_name, "b": b_name, "metric": metric,
                          "cells": "; ".join(f"{s['model']}/{s['task']}/{s['method']}" for *_, s in pairs)}
                out.append({**record, **wilcoxon_summary([p[0] for p in pairs], [p[1] for p in pairs])})
    return out


# ------------------------------------------------------------------------------------ output
FIELDS = ("level", "model", "task", "method", "a", "b", "metric", "n", "n_nonzero", "mean_a", "mean_b",
          "mean_difference", "statistic", "p_value", "p_exact", "significant", "note", "cells")


def _fmt(value, digits=4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def to_markdown(per_example: list[dict], cells: list[dict]) -> str:
    lines = [
        "Wilcoxon signed-rank, two-sided, zero differences dropped; A vs B, mean Δ = mean(A − B) "
        f"(positive favours A); significant at p ≤ {ALPHA} (p_exact when given).",
        "",
        "### Per example (paired by id)",
        "",
    ]
    cols = ["model", "task", "a", "b", "metric", "n", "n_nonzero", "mean_a", "mean_b", "mean_difference",
            "statistic", "p_value", "p_exact", "significant", "note"]
    heads = ["model", "task", "A", "B", "score", "n", "n≠0", "mean A", "mean B", "mean Δ", "W", "p", "p exact",
             "p ≤ 0.05", "note"]
    lines += _md_table(heads, cols, per_example) if per_example else ["(no comparable pairs with predictions)"]
    lines += ["", "### Across model × task cells (paper §4.3)", ""]
    cols = ["task", "a", "b", "metric", "n", "n_nonzero", "mean_difference", "statistic", "p_value", "p_exact",
            "significant", "note"]
    heads = ["tasks", "A", "B", "metric", "cells", "n≠0", "mean Δ", "W", "p", "p exact", "p ≤ 0.05", "note"]
    lines += _md_table(heads, cols, cells) if cells else ["(no comparable cells)"]
    return "\n".join(lines)


def _md_table(heads, cols, records) -> list[str]:
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join("---" for _ in heads) + " |"]
    for r in records:
        cells = [f"{r[c]:g}" if c == "statistic" and r.get(c) is not None else _fmt(r.get(c)) for c in cols]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return lines


def to_csv(per_example: list[dict], cells: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in [*per_example, *cells]:
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in FIELDS})
    return buffer.getvalue()
