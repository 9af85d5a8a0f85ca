"""Quality of a binary defect detector: point metrics, bootstrap intervals, teacher–student agreement.

Every function takes the probability of *defect* (class 1) per image, as a 1-D float tensor, numpy
array or list, and 0/1 labels (1 = defect). A decision is *defect when prob >= threshold*, the
same rule :mod:`profiling.report.thresholds` uses to choose the threshold on validation.

torchmetrics computes the point metrics. Two of its conventions are worked around on purpose:
its float inputs are thresholded with a strict ``>`` (so we pass it our own 0/1 decisions), and
float inputs outside [0, 1] are silently passed through a sigmoid (so we reject them: logits here
are a caller bug, not something to guess about).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_confusion_matrix,
    binary_f1_score,
    binary_matthews_corrcoef,
    binary_precision,
    binary_precision_recall_curve,
    binary_recall,
    binary_roc,
    binary_specificity,
)

from core.errors import UserError

__all__ = [
    "ArrayLike",
    "as_scores",
    "binary_metrics",
    "bootstrap_ci",
    "paired_auroc_delta",
    "BOOTSTRAP_METRICS",
    "agreement",
    "mean_kl",
    "roc_points",
    "pr_points",
]

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _as_probs(probs: ArrayLike, name: str = "probs") -> Tensor:
    # Lists go through numpy: torch.as_tensor would make them float32 and move 0.7 to 0.69999999.
    p = probs if isinstance(probs, Tensor) else torch.from_numpy(np.asarray(probs, dtype=np.float64))
    p = p.detach().cpu().to(torch.float64)
    if p.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (the probability of defect per image), got shape {tuple(p.shape)}; "
            "for two-class softmax output pass probs[:, 1]"
        )
    if p.numel() and (not torch.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError(f"{name} must be probabilities in [0, 1]; got values in [{p.min():g}, {p.max():g}] (logits?)")
    return p


def as_scores(probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Checked (float64 probability of defect, int64 0/1 label) pair of 1-D tensors.

    Float32 scores widen to float64 exactly, so a threshold read back from a score compares equal.
    An empty pair is a :class:`UserError` (an empty split is the user's to fix); wrong shapes,
    logits or labels other than 0/1 are caller bugs and raise ``ValueError``.
    """
    p = _as_probs(probs)
    y = labels if isinstance(labels, Tensor) else torch.from_numpy(np.asarray(labels))
    y = y.detach().cpu()
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels must be 1-D and match probs {tuple(p.shape)}, got shape {tuple(y.shape)}")
    if p.numel() == 0:
        raise UserError("no predictions to score: the split is empty; give it images (see data.split)")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (defect), got values {sorted(set(y.tolist()))[:10]}")
    return p, y.to(torch.int64)


def binary_metrics(probs: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float | int | list[list[int]]]:
    """All point metrics at one threshold, plus the threshold-free AUROC, AUPRC and calibration error.

    ``ece`` is torchmetrics' binary L1 calibration error over 15 equal-width bins of the defect
    probability (|mean prob - defect rate| per bin, weighted by bin size). ``confusion_matrix`` is
    ``[[tn, fp], [fn, tp]]``, rows the true class. ``precision`` is 0 when nothing is called defect.
    torchmetrics returns float32, so a recomputation agrees to about 1e-7, not bit for bit.

    With one class only in ``labels``, AUROC and AUPRC are undefined and come back as NaN (not 0,
    not 0.5: a number there would look like a result); so does MCC, and so do recall and balanced
    accuracy without defects, and specificity and balanced accuracy without normals.
    """
    p, y = as_scores(probs, labels)
    pred = (p >= threshold).to(torch.int64)
    (tn, fp), (fn, tp) = binary_confusion_matrix(pred, y).tolist()
    n_defect, n_normal = tp + fn, tn + fp
    nan = float("nan")
    recall = binary_recall(pred, y).item() if n_defect else nan
    specificity = binary_specificity(pred, y).item() if n_normal else nan
    both = n_defect > 0 and n_normal > 0
    return {
        "accuracy": binary_accuracy(pred, y).item(),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": binary_precision(pred, y).item(),
        "recall": recall,
        "specificity": specificity,
        "f1": binary_f1_score(pred, y).item(),
        "auroc": binary_auroc(p, y).item() if both else nan,
        "auprc": binary_average_precision(p, y).item() if both else nan,
        "mcc": binary_matthews_corrcoef(pred, y).item() if both else nan,
        "ece": binary_calibration_error(p, y, n_bins=15, norm="l1").item(),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": int(y.numel()),
        "n_defect": int(n_defect),
        "threshold": float(threshold),
    }


# --- bootstrap -------------------------------------------------------------------------------
# Each resample is summarised by its confusion counts (tp, fp, tn, fn: float arrays of shape (B,))
# and, for AUROC, by its Mann–Whitney statistic; every metric is then one vectorised expression.


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


_Counts = dict[str, np.ndarray]
BOOTSTRAP_METRICS: dict[str, Callable[[_Counts], np.ndarray]] = {
    "auroc": lambda c: c["auroc"],
    "f1": lambda c: _safe_div(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
    "precision": lambda c: _safe_div(c["tp"], c["tp"] + c["fp"]),
    "recall": lambda c: c["tp"] / (c["tp"] + c["fn"]),
    "specificity": lambda c: c["tn"] / (c["tn"] + c["fp"]),
    "accuracy": lambda c: (c["tp"] + c["tn"]) / (c["tp"] + c["tn"] + c["fp"] + c["fn"]),
    "balanced_accuracy": lambda c: (c["tp"] / (c["tp"] + c["fn"]) + c["tn"] / (c["tn"] + c["fp"])) / 2,
}


def _resampled_auroc(group_pos: np.ndarray, group_neg: np.ndarray, n_groups: int) -> np.ndarray:
    """AUROC of each resample from the tie groups (ranks of distinct scores) of its drawn items.

    AUROC = P(score_defect > score_normal) + ½ P(equal). Per resample, count the drawn normals in
    each score group; a defect in group g beats the normals of groups below g and ties with those
    in g. Exact with ties, and O(B × n) time and memory rather than O(B × n_defect × n_normal).
    """
    b, n_pos = group_pos.shape
    n_neg = group_neg.shape[1]
    offsets = (np.arange(b) * n_groups)[:, None]
    neg_per_group = np.bincount((group_neg + offsets).ravel(), minlength=b * n_groups).reshape(b, n_groups)
    pos_per_group = np.bincount((group_pos + offsets).ravel(), minlength=b * n_groups).reshape(b, n_groups)
    neg_below = np.cumsum(neg_per_group, axis=1) - neg_per_group
    wins = (pos_per_group * (neg_below + 0.5 * neg_per_group)).sum(axis=1)
    return wins / (n_pos * n_neg)


def _resampled_metrics(
    p: np.ndarray,
    is_defect: np.ndarray,
    threshold: float,
    draw_pos: np.ndarray,
    draw_neg: np.ndarray,
    metrics: Sequence[str],
) -> dict[str, np.ndarray]:
    """Each metric on each resample; row b of ``draw_pos`` / ``draw_neg`` indexes the defects /
    normals (in their original order) drawn into resample b."""
    n_pos, n_neg = draw_pos.shape[1], draw_neg.shape[1]
    called = p >= threshold
    tp = called[is_defect][draw_pos].sum(axis=1).astype(np.float64)
    fp = called[~is_defect][draw_neg].sum(axis=1).astype(np.float64)
    counts: _Counts = {"tp": tp, "fn": n_pos - tp, "fp": fp, "tn": n_neg - fp}
    if "auroc" in metrics:
        counts["auroc"] = _auroc_of_draws(p, is_defect, draw_pos, draw_neg)
    return {m: BOOTSTRAP_METRICS[m](counts) for m in metrics}


def _auroc_of_draws(p: np.ndarray, is_defect: np.ndarray, draw_pos: np.ndarray, draw_neg: np.ndarray) -> np.ndarray:
    """AUROC of scores ``p`` on each resample (rows of ``draw_pos`` / ``draw_neg``)."""
    uniq, group = np.unique(p, return_inverse=True)
    return _resampled_auroc(group[is_defect][draw_pos], group[~is_defect][draw_neg], len(uniq))


def bootstrap_ci(
    probs: ArrayLike,
    labels: ArrayLike,
    threshold: float,
    metrics: Sequence[str] = ("auroc", "f1"),
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval ``(low, high)`` per metric, from ``n`` resamples.

    Resampling is stratified: each resample draws n_defect defects from the defects and n_normal
    normals from the normals, with replacement. Both classes are then always present (AUROC stays
    defined) and the class mix is that of the test split; the interval reflects which images were
    drawn, not uncertainty about the prevalence. With one class only, every interval is (NaN, NaN).
    Metrics are computed vectorised over resamples (``BOOTSTRAP_METRICS``), not with torchmetrics
    per resample; the tests check them against :func:`binary_metrics`.
    """
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown bootstrap metric(s) {unknown}; valid: {sorted(BOOTSTRAP_METRICS)}")
    p, y = as_scores(probs, labels)
    draws = _stratified_draws(y, n, ci, seed)
    if draws is None:
        return {m: (float("nan"), float("nan")) for m in metrics}
    values = _resampled_metrics(p.numpy(), y.numpy().astype(bool), threshold, *draws, metrics)
    return {m: _interval(values[m], ci) for m in metrics}


def _stratified_draws(y: Tensor, n: int, ci: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``n`` stratified resamples: indices into the defects ``(n, n_defect)`` and into the normals
    ``(n, n_normal)``; None when a class is missing (no AUROC to resample)."""
    if n < 1:
        raise ValueError(f"n (resamples) must be >= 1, got {n}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_pos, size=(n, n_pos)), rng.integers(0, n_neg, size=(n, n_neg))


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    alpha = (1 - ci) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_auroc_delta(probs_a: ArrayLike, probs_b: ArrayLike, labels: ArrayLike, n: int = 1000,
                       ci: float = 0.95, seed: int = 0) -> dict[str, float]:
    """AUROC of model a minus that of model b on the same images, with a paired bootstrap interval.

    Both models are scored on the same stratified resamples (those of :func:`bootstrap_ci`), so
    what they share (which images are hard) cancels and the interval is that of the difference:
    ``{"delta", "low", "high", "sd"}``. Its width says what gap the split can resolve: on 80
    defects and 320 normals, with both models near 0.985, it was about ±0.011.
    """
    pa, y = as_scores(probs_a, labels)
    pb, _ = as_scores(probs_b, labels)
    draws = _stratified_draws(y, n, ci, seed)
    if draws is None:
        return {"delta": float("nan"), "low": float("nan"), "high": float("nan"), "sd": float("nan")}
    is_defect = y.numpy().astype(bool)
    diff = _auroc_of_draws(pa.numpy(), is_defect, *draws) - _auroc_of_draws(pb.numpy(), is_defect, *draws)
    low, high = _interval(diff, ci)
    return {"delta": binary_auroc(pa, y).item() - binary_auroc(pb, y).item(), "low": low, "high": high,
            "sd": float(diff.std(ddof=1)) if n > 1 else 0.0}


# --- teacher vs student ----------------------------------------------------------------------


def _paired(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    pa, pb = _as_probs(a, names[0]), _as_probs(b, names[1])
    if pa.shape != pb.shape:
        raise ValueError(f"{names[0]} and {names[1]} must be the same images: shapes {tuple(pa.shape)} vs {tuple(pb.shape)}")
    if pa.numel() == 0:
        raise UserError("no predictions to compare: the split is empty; give it images (see data.split)")
    return pa, pb


def agreement(probs_a: ArrayLike, probs_b: ArrayLike, threshold_a: float, threshold_b: float) -> float:
    """Fraction of images on which two models, each at its own threshold, make the same decision."""
    pa, pb = _paired(probs_a, probs_b, ("probs_a", "probs_b"))
    return ((pa >= threshold_a) == (pb >= threshold_b)).double().mean().item()


def mean_kl(probs_teacher: ArrayLike, probs_student: ArrayLike, eps: float = 1e-7) -> float:
    """Mean over images of KL(teacher ‖ student) in nats, on the two-class distributions [1-p, p].

    Probabilities are clamped below at ``eps`` inside the log, so a student that is certain and
    wrong costs about log(1/eps) ≈ 16 nats per image instead of infinity; a teacher probability
    of exactly 0 contributes 0 (the 0·log 0 = 0 convention).
    """
    pt, ps = _paired(probs_teacher, probs_student, ("probs_teacher", "probs_student"))
    t = torch.stack([1 - pt, pt], dim=1)
    s = torch.stack([1 - ps, ps], dim=1)
    terms = torch.where(t > 0, t * (t.clamp_min(eps).log() - s.clamp_min(eps).log()), torch.zeros_like(t))
    return terms.sum(dim=1).mean().item()


# --- curves for plotting ---------------------------------------------------------------------


def _curve_inputs(probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor] | None:
    p, y = as_scores(probs, labels)
    return (p, y) if 0 < int(y.sum()) < y.numel() else None


def roc_points(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` from torchmetrics' ``binary_roc``, as numpy arrays for plotting.

    Without both classes there is no ROC curve: three empty arrays, so a plot shows nothing rather
    than a made-up line. torchmetrics prepends the (0, 0) point with threshold 1.0.
    """
    inputs = _curve_inputs(probs, labels)
    if inputs is None:
        return np.empty(0), np.empty(0), np.empty(0)
    fpr, tpr, thr = binary_roc(*inputs)
    return fpr.numpy(), tpr.numpy(), thr.numpy()


def pr_points(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` from torchmetrics' ``binary_precision_recall_curve``.

    As torchmetrics returns them: precision and recall have one more entry than thresholds (the
    final (precision 1, recall 0) point). Empty arrays without both classes, as for :func:`roc_points`.
    """
    inputs = _curve_inputs(probs, labels)
    if inputs is None:
        return np.empty(0), np.empty(0), np.empty(0)
    precision, recall, thr = binary_precision_recall_curve(*inputs)
    return precision.numpy(), recall.numpy(), thr.numpy()
