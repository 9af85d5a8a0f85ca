"""The report's figures, as PNG files (matplotlib, Agg backend: no display needed).

Each function takes plain numbers (probabilities, labels, thresholds, latencies), draws one figure
and writes it; none of them reads a run directory. A model without both classes on test has no
curve, and its absence is written on the axis rather than drawn as a made-up line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from profiling.report.quality import pr_points, roc_points

__all__ = ["Scores", "confusion_matrices", "error_grid", "pareto", "pr_curves", "roc_curves", "score_histograms"]

#: name -> (probability of defect, 0/1 labels, threshold) on the test split
Scores = dict[str, tuple[np.ndarray, np.ndarray, float]]

_DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_curves(scores: Scores, aurocs: dict[str, float | None], path: Path) -> Path:
    """ROC curves of every model on one axis, with each model's operating point at its threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (p, y, thr) in scores.items():
        fpr, tpr, _ = roc_points(p, y)
        if not len(fpr):
            continue
        auc = aurocs.get(name)
        line, = ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})" if auc is not None else name)
        called = p >= thr
        ax.plot([called[y == 0].mean()], [called[y == 1].mean()], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="false positive rate (normals called defect)", ylabel="recall (defects caught)",
           title="ROC on test (dots: operating point at the threshold)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_curves(scores: Scores, path: Path) -> Path:
    """Precision-recall curves of every model on one axis; the dashed line is the defect rate."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    rate = None
    for name, (p, y, _) in scores.items():
        precision, recall, _ = pr_points(p, y)
        if len(precision):
            ax.plot(recall, precision, label=name)
            rate = float(np.mean(y))
    if rate is not None:
        ax.axhline(rate, ls="--", color="grey", lw=1, label=f"chance (defect rate {rate:.2f})")
    ax.set(xlabel="recall (defects caught)", ylabel="precision", title="Precision-recall on test",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def confusion_matrices(matrices: dict[str, list[list[int]]], thresholds: dict[str, float], path: Path) -> Path:
    """One 2x2 confusion matrix per model (rows: true class, columns: decision), counts in the cells."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False, sharey=True)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        m = np.asarray(cm)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1))
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["normal", "defect"])
        ax.set_yticks([0, 1], ["normal", "defect"])
        ax.set(xlabel="decision", title=f"{name}\nthreshold {thresholds[name]:.3g}")
    axes[0, 0].set_ylabel("true class")
    fig.suptitle("Confusion matrices on test", y=1.04)
    return _save(fig, path)


def score_histograms(scores: Scores, path: Path) -> Path:
    """Per model, the test scores of normals and of defects, with the decision threshold."""
    n = len(scores)
    fig, axes = plt.subplots(n, 1, figsize=(6, 1.9 * n), squeeze=False, sharex=True)
    bins = np.linspace(0, 1, 41)
    for ax, (name, (p, y, thr)) in zip(axes[:, 0], scores.items()):
        ax.hist(p[y == 0], bins=bins, alpha=0.6, label=f"normal ({int((y == 0).sum())})", color="tab:blue")
        ax.hist(p[y == 1], bins=bins, alpha=0.6, label=f"defect ({int((y == 1).sum())})", color="tab:red")
        ax.axvline(thr, color="black", ls="--", lw=1, label=f"threshold {thr:.3g}")
        ax.set_ylabel(name, fontsize=8)
        ax.legend(fontsize=7, loc="upper center")
    axes[-1, 0].set_xlabel("probability of defect (test)")
    return _save(fig, path)


def pareto(points: dict[str, tuple[float, float, tuple[float, float] | None]], xlabel: str, path: Path,
           deployed: str | None = None, max_latency: float | None = None) -> Path:
    """Latency against test AUROC, one dot per model (bars: the AUROC's bootstrap interval).

    The line joins the Pareto front: models no other model beats on both latency and AUROC.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (ms, auc, ci) in points.items():
        err = None if ci is None or None in ci else [[auc - ci[0]], [ci[1] - auc]]
        ax.errorbar([ms], [auc], yerr=err, fmt="*" if name == deployed else "o", ms=12 if name == deployed else 7,
                    capsize=3, label=name + (" (deployed)" if name == deployed else ""))
    ordered = sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1]))
    front, best = [], -np.inf
    for _, (ms, auc, _) in ordered:
        if auc > best:
            front.append((ms, auc))
            best = auc
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="grey", lw=1, label="Pareto front")
    if max_latency is not None:
        ax.axvline(max_latency, color="red", lw=1, ls=":", label=f"max_latency_ms {max_latency:g}")
    times = [ms for ms, _, _ in points.values()] + ([max_latency] if max_latency else [])
    if max(times) > 10 * min(times):  # a log axis only where the latencies span orders of magnitude
        ax.set_xscale("log")
        xlabel += ", log scale"
    ax.set(xlabel=xlabel, ylabel="test AUROC", title="Latency vs accuracy (up and left is better)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def error_grid(rows: dict[str, Sequence[tuple[np.ndarray | None, str]]], title: str, path: Path) -> Path:
    """Rows of images with a caption each (e.g. worst false negatives, worst false positives).

    An image that could not be loaded (``None``) is drawn as an empty, labelled cell; a row with
    no images says "none".
    """
    width = max([len(v) for v in rows.values()] + [1])
    fig, axes = plt.subplots(len(rows), width, figsize=(1.9 * width, 2.3 * len(rows)), squeeze=False)
    for r, (label, items) in enumerate(rows.items()):
        for c in range(width):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                if c == 0:
                    ax.text(0.0, 0.5, f"{label}: none", fontsize=9, va="center")
                continue
            image, caption = items[c]
            if image is None:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(image)
            ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
