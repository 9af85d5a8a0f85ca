"""Choosing the decision threshold on the validation split (never on test).

A decision is *defect when prob >= threshold*. The candidates are the distinct validation scores:
between two neighbouring scores every threshold makes the same decisions on validation, so
nothing else could be chosen on the evidence. The rules (``eval.threshold``):

- ``f1``: the threshold with the highest F1 of the defect class.
- ``youden``: the highest Youden's J = recall - (1 - specificity) = TPR - FPR.
- ``recall@R``: the highest threshold whose defect recall is still >= R. Recall only falls as the
  threshold rises and specificity only rises, so this is the best specificity that keeps recall
  >= R: the operating point of an inspection line that may miss at most a fraction 1-R of defects.

Ties (equal F1, or equal J, at several thresholds) go to the *lowest* tied threshold. Between two
tied thresholds the lower one calls more images defect, and a tie means the extra images include
defects (for F1, extra normals alone would lower the score; for J, equal score means equal TPR and
FPR gains, and at least one is > 0). So the lower threshold catches strictly more defects for a
score the rule rates the same, and a missed defect is the costly error here (DESIGN: "very few
missed defects"). Ties are found exactly, on integer counts, not on rounded floats.

With only ``P`` validation defects, recall moves in steps of 1/P: ``recall@0.99`` with fewer than
100 defects means catching every validation defect. ``ThresholdChoice`` carries the counts so the
report can say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from profiling.report.config import parse_threshold_rule
from profiling.report.quality import ArrayLike, as_scores

__all__ = ["ThresholdChoice", "choose_threshold"]


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold, the rule that chose it, and the validation metrics at it."""

    rule: str
    threshold: float
    recall: float
    specificity: float
    precision: float
    f1: float
    n_defect: int
    n_normal: int


def _operating_points(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, fp)`` for every distinct score, thresholds descending, decision ``>=``.

    Not torchmetrics' ``binary_roc``: that prepends an extra point at threshold 1.0 (which would
    contradict ``>=`` when a score is exactly 1.0) and gives rates as floats, where the tie-breaking
    here needs exact integer counts.
    """
    order = np.argsort(-probs, kind="stable")
    s, y = probs[order], labels[order].astype(np.int64)
    last_of_group = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    return s[last_of_group], np.cumsum(y)[last_of_group], np.cumsum(1 - y)[last_of_group]


def _check_classes(n_defect: int, n_normal: int, rule: str) -> None:
    missing = "defect" if n_defect == 0 else "normal" if n_normal == 0 else None
    if missing is None:
        return
    present, count = ("normal", n_normal) if missing == "defect" else ("defect", n_defect)
    raise UserError(
        f"the validation split has no {missing} images (only {count} {present}), so the decision "
        f"threshold (eval.threshold={rule}) cannot be chosen: recall and specificity need both classes. "
        f"Add {missing} images to the validation split, or split differently (a larger validation "
        "fraction in data.split, or a source whose val/ folder holds both classes)."
    )


def choose_threshold(val_probs: ArrayLike, val_labels: ArrayLike, rule: str) -> ThresholdChoice:
    """The threshold ``rule`` picks from validation scores, with the validation metrics at it.

    Raises :class:`UserError` when validation is empty or lacks a class: a threshold chosen without
    defects (or without normals) would be a silent guess, not a choice.
    """
    kind, target_recall = parse_threshold_rule(rule)
    if len(val_labels) == 0:
        raise UserError(
            f"the validation split is empty, so the decision threshold (eval.threshold={rule}) cannot be "
            "chosen; give validation images of both classes (a validation fraction in data.split, or a val/ folder)"
        )
    p, y = as_scores(val_probs, val_labels)
    n_defect = int(y.sum())
    n_normal = int(y.numel()) - n_defect
    _check_classes(n_defect, n_normal, rule)

    thr, tp, fp = _operating_points(p.numpy(), y.numpy())
    fn = n_defect - tp
    if kind == "f1":
        # F1 = 2tp / (2tp + fp + fn): one division of integers, so equal F1 gives equal floats.
        score = 2 * tp / (2 * tp + fp + fn)
    elif kind == "youden":
        # J · P · N = tp·N - fp·P, an integer: exact ties.
        score = tp * n_normal - fp * n_defect
    else:
        # Rounding first keeps e.g. 0.07 * 100 = 7.000000000000001 from demanding 8 defects.
        needed = math.ceil(round(target_recall * n_defect, 9))
        score = (tp >= needed).astype(np.int64)  # the first (highest) feasible threshold wins below
    best = np.flatnonzero(score == score.max())
    i = best[0] if kind == "recall" else best[-1]  # thresholds descend: [-1] is the lowest tied one

    tp_i, fp_i, fn_i = int(tp[i]), int(fp[i]), int(fn[i])
    return ThresholdChoice(
        rule=rule,
        threshold=float(thr[i]),
        recall=tp_i / n_defect,
        specificity=(n_normal - fp_i) / n_normal,
        precision=tp_i / (tp_i + fp_i),
        f1=2 * tp_i / (2 * tp_i + fp_i + fn_i),
        n_defect=n_defect,
        n_normal=n_normal,
    )
