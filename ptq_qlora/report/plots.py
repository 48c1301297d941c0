"""PNG plots (matplotlib, Agg): the primary metric per task by model and point, the primary metric
against the bit width (when a method ran at several), and per-example scores of a PTQ vs
PTQ+QLoRA pair."""
from __future__ import annotations

import re
from pathlib import Path

from ptq_qlora.report.collect import EvalRow
from ptq_qlora.report.significance import aligned_scores, comparison_sets, per_example_key
from ptq_qlora.point_labels import parse as parse_label
from ptq_qlora.report.table import PRIMARY, has_bits_axis, ordered_models, ordered_tasks, point_sort_key

_TITLES = {"f1_micro": "F1-micro", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
           "rougeLsum": "ROUGE-Lsum", "correct": "correct (0/1)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def primary_metric(kind: str, metric_for_generation: str = "rougeL") -> str | None:
    return metric_for_generation if kind == "generation" else PRIMARY.get(kind)


def plot_task_bars(rows: list[EvalRow], task: str, path: Path, metric_for_generation: str = "rougeL") -> Path | None:
    """Grouped bars: one group per model, one bar per point, height = the task's primary metric."""
    rows = [r for r in rows if r.task == task]
    if not rows:
        return None
    metric = primary_metric(rows[0].kind, metric_for_generation)
    rows = [r for r in rows if metric in r.metrics]
    if not rows:
        return None
    plt = _pyplot()
    models = ordered_models({r.model for r in rows})
    labels = sorted({r.label for r in rows}, key=point_sort_key)
    value = {(r.model, r.label): r.metrics[metric] for r in rows}
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(labels)) / 2.5), 4.2))
    colors = plt.get_cmap("tab10")
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i, m in enumerate(models) if (m, label) in value]
        ys = [value[(m, label)] for m in models if (m, label) in value]
        bars = ax.bar(xs, ys, width * 0.95, label=label, color=colors(j % 10))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1, rotation=90 if len(labels) > 3 else 0)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(_TITLES.get(metric, metric))
    top = max(value.values())
    ax.set_ylim(0, min(1.0, top * 1.25) if top <= 1 else top * 1.25)
    ax.set_title(f"{task}: {_TITLES.get(metric, metric)} by model and point")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_bits(rows: list[EvalRow], task: str, path: Path, metric_for_generation: str = "rougeL") -> Path | None:
    """The task's primary metric against the weight bit width: one panel per model that has a PTQ
    method at several widths, one line per method (solid: PTQ, dashed: +QLoRA; square markers: the
    no-SFT ablation), SFT-16bit as a dotted reference. None when no method has several widths."""
    rows = [r for r in rows if r.task == task]
    if not rows:
        return None
    metric = primary_metric(rows[0].kind, metric_for_generation)
    rows = [r for r in rows if metric in r.metrics]
    models = [m for m in ordered_models({r.model for r in rows})
              if has_bits_axis(r.label for r in rows if r.model == m)]
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    families = sorted({(parse_label(r.label).family, parse_label(r.label).no_sft) for r in rows
                       if parse_label(r.label).is_ptq}, key=lambda f: (f[1], f[0]))
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r.model == model]
        series: dict[tuple, list[tuple[int, float]]] = {}
        for r in mine:
            p = parse_label(r.label)
            if p.is_ptq:
                series.setdefault((p.family, p.no_sft, p.qlora), []).append((r.bits or p.bits, r.metrics[metric]))
        for (family, no_sft, qlora), points in sorted(series.items()):
            points.sort()
            name = family + ("+QLoRA" if qlora else "") + (" (no SFT)" if no_sft else "")
            ax.plot([b for b, _ in points], [v for _, v in points], color=colors(families.index((family, no_sft)) % 10),
                    ls="--" if qlora else "-", marker="s" if no_sft else "o", label=name)
        sft = next((r for r in mine if r.label == "SFT-16bit"), None)
        if sft is not None:
            ax.axhline(sft.metrics[metric], color="grey", ls=":", label="SFT-16bit")
        widths = sorted({b for pts in series.values() for b, _ in pts})
        ax.set_xticks(widths, [str(b) for b in widths])
        ax.set_xlabel("weight bits")
        ax.set_ylabel(_TITLES.get(metric, metric))
        ax.set_title(f"{model} / {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{task}: {_TITLES.get(metric, metric)} by bit width")
    return _save(plt, fig, path)


def plot_pair(a: EvalRow, b: EvalRow, key: str, path: Path) -> Path:
    """Per-example scores of A (y) vs B (x) and the histogram of A - B, paired by id."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ids, sa, sb, _ = aligned_scores(a, b, key)
    diffs = [x - y for x, y in zip(sa, sb)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    if key == "correct":  # 0/1 scores: a 2x2 table of counts reads better than overlapping dots
        counts = {(i, j): sum(1 for x, y in zip(sb, sa) if x == i and y == j) for i in (0, 1) for j in (0, 1)}
        grid = [[counts[(i, j)] for i in (0, 1)] for j in (0, 1)]
        left.imshow(grid, cmap="Blues", origin="lower")
        for i in (0, 1):
            for j in (0, 1):
                dark = counts[(i, j)] > 0.5 * max(counts.values())
                left.text(i, j, str(counts[(i, j)]), ha="center", va="center", fontsize=12,
                          color="white" if dark else "black")
        left.set_xticks([0, 1], ["wrong", "right"])
        left.set_yticks([0, 1], ["wrong", "right"])
    else:
        left.scatter(sb, sa, s=10, alpha=0.5)
        lo, hi = min(sa + sb + [0.0]), max(sa + sb + [1.0])
        left.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    left.set_xlabel(f"{b.label}: {_TITLES.get(key, key)}")
    left.set_ylabel(f"{a.label}: {_TITLES.get(key, key)}")
    left.set_title(f"{a.model} / {a.task}: per example (n={len(ids)})")
    bins = [-1.5, -0.5, 0.5, 1.5] if key == "correct" else 30
    right.hist(diffs, bins=bins, color="tab:blue", edgecolor="white")
    right.axvline(0, color="grey", lw=1, ls="--")
    if key == "correct":
        right.set_xticks([-1, 0, 1], ["−1 (A wrong,\nB right)", "0 (same)", "+1 (A right,\nB wrong)"])
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    right.axvline(mean, color="tab:red", lw=1.5, label=f"mean Δ = {mean:+.4f}")
    right.set_xlabel(f"{a.label} − {b.label}")
    right.set_ylabel("examples")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_title("per-example difference")
    right.legend(fontsize=8)
    return _save(plt, fig, path)


def write_plots(rows: list[EvalRow], out_dir: Path, metric_for_generation: str = "rougeL", tasks=None) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for task in ordered_tasks({r.task for r in rows}, tasks):
        made = plot_task_bars(rows, task, out_dir / f"bars_{_slug(task)}.png", metric_for_generation)
        if made:
            paths.append(made)
        made = plot_bits(rows, task, out_dir / f"bits_{_slug(task)}.png", metric_for_generation)
        if made:
            paths.append(made)
    for group in comparison_sets(rows):
        a, b = group["PTQ+QLoRA"], group["PTQ"]
        key = per_example_key(group["kind"], metric_for_generation)
        if a is None or b is None or key is None or a.predictions is None or b.predictions is None:
            continue
        name = f"pair_{_slug(group['model'])}_{_slug(group['task'])}_{_slug(group['method'])}.png"
        try:
            paths.append(plot_pair(a, b, key, out_dir / name))
        except (OSError, ValueError, KeyError):
            continue
    return paths


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
