"""Threshold selection on constructed validation scores with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import UserError
from profiling.report.quality import binary_metrics
from profiling.report.thresholds import ThresholdChoice, choose_threshold

# Overlapping scores, 5 defects (D) and 5 normals (N), listed from the highest score down.
# Decision "defect when prob >= t"; at each distinct score t (hand-counted):
#   t     item  tp fp fn   F1 = 2tp/(2tp+fp+fn)   J = tp/5 - fp/5
#   0.95  D     1  0  4    2/6                     0.2
#   0.85  D     2  0  3    4/7                     0.4
#   0.75  N     2  1  3    4/8                     0.2
#   0.65  D     3  1  2    6/9                     0.4
#   0.55  N     3  2  2    6/10                    0.2
#   0.45  D     4  2  1    8/11  <- max F1         0.4   (J ties at 0.85, 0.65, 0.45)
#   0.35  N     4  3  1    8/12                    0.2
#   0.25  N     4  4  1    8/13                    0.0
#   0.15  D     5  4  0    10/14                   0.2
#   0.05  N     5  5  0    10/15                   0.0
OVERLAP_P = [0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05]
OVERLAP_Y = [1, 1, 0, 1, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("rule", ["f1", "youden", "recall@0.99", "recall@1.0"])
def test_separable_scores_put_the_threshold_at_the_lowest_defect(rule: str) -> None:
    # F1 = J = 1 only at 0.7 (at 0.3 one normal is called defect); recall 1 needs t <= 0.7.
    choice = choose_threshold([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1], rule)
    assert choice == ThresholdChoice(rule, 0.7, 1.0, 1.0, 1.0, 1.0, n_defect=3, n_normal=3)


def test_f1_on_overlapping_scores() -> None:
    c = choose_threshold(OVERLAP_P, OVERLAP_Y, "f1")
    assert c.threshold == 0.45
    assert c.f1 == pytest.approx(8 / 11)
    assert (c.recall, c.specificity, c.precision) == pytest.approx((4 / 5, 3 / 5, 4 / 6))


def test_youden_tie_goes_to_the_lowest_threshold() -> None:
    # J = 0.4 at 0.85, 0.65 and 0.45; the lowest catches the most defects.
    c = choose_threshold(OVERLAP_P, OVERLAP_Y, "youden")
    assert c.threshold == 0.45
    assert (c.recall, c.specificity) == pytest.approx((0.8, 0.6))


@pytest.mark.parametrize(
    ("rule", "threshold", "recall", "specificity"),
    [
        ("recall@0.6", 0.65, 3 / 5, 4 / 5),  # needs 3 of 5 defects
        ("recall@0.8", 0.45, 4 / 5, 3 / 5),  # needs 4 of 5
        ("recall@0.99", 0.15, 1.0, 1 / 5),  # needs all 5: only the lowest defect score does it
    ],
)
def test_recall_at_r_takes_the_highest_threshold_that_keeps_recall(
    rule: str, threshold: float, recall: float, specificity: float
) -> None:
    c = choose_threshold(OVERLAP_P, OVERLAP_Y, rule)
    assert c.threshold == threshold
    assert (c.recall, c.specificity) == pytest.approx((recall, specificity))
    assert c.recall >= float(rule.split("@")[1])


def test_f1_tie_goes_to_the_lowest_threshold() -> None:
    # D 0.9, N 0.8, N 0.7, D 0.6, N 0.1: F1 = 2/3 at t=0.9 (tp1 fp0 fn1) and 4/6 at t=0.6 (tp2 fp2 fn0).
    c = choose_threshold([0.9, 0.8, 0.7, 0.6, 0.1], [1, 0, 0, 1, 0], "f1")
    assert c.threshold == 0.6
    assert c.f1 == pytest.approx(2 / 3)
    assert c.recall == 1.0


def test_tied_scores_across_classes_stay_together() -> None:
    # D 0.8, D 0.5, N 0.5, N 0.2: no threshold separates the two 0.5s; candidates are 0.8, 0.5, 0.2.
    # F1: 2/3, 4/5, 4/6 -> 0.5.  J: 0.5, 0.5, 0 -> tie -> 0.5.  recall 1 -> 0.5, flagging the tied normal.
    probs, labels = [0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]
    for rule in ("f1", "youden", "recall@0.99"):
        c = choose_threshold(probs, labels, rule)
        assert c.threshold == 0.5, rule
        assert (c.recall, c.specificity, c.precision) == pytest.approx((1.0, 0.5, 2 / 3)), rule


def test_recall_target_is_not_inflated_by_float_rounding() -> None:
    # 0.07 * 100 == 7.000000000000001 in floats; a plain ceil would demand 8 of 100 defects.
    assert 0.07 * 100 > 7
    defects = np.arange(1, 101) / 1000 + 0.5  # 0.501 .. 0.600
    probs = np.r_[defects, np.full(10, 0.1)]
    labels = np.r_[np.ones(100, dtype=int), np.zeros(10, dtype=int)]
    c = choose_threshold(probs, labels, "recall@0.07")
    assert c.threshold == pytest.approx(0.594)  # the 7th highest defect score
    assert c.recall == pytest.approx(0.07)


def test_threshold_reproduces_its_validation_metrics_on_float32_scores() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = torch.from_numpy(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)).float()
    for rule in ("f1", "youden", "recall@0.9"):
        c = choose_threshold(probs, labels, rule)
        assert c.threshold in set(probs.double().tolist())
        m = binary_metrics(probs, labels, c.threshold)
        assert (m["recall"], m["specificity"], m["f1"]) == pytest.approx((c.recall, c.specificity, c.f1), abs=1e-6)


def test_inputs_as_list_numpy_and_tensor_agree() -> None:
    as_list = choose_threshold(OVERLAP_P, OVERLAP_Y, "f1")
    assert choose_threshold(np.array(OVERLAP_P), np.array(OVERLAP_Y), "f1") == as_list
    assert choose_threshold(torch.tensor(OVERLAP_P, dtype=torch.float64), torch.tensor(OVERLAP_Y), "f1") == as_list


@pytest.mark.parametrize(
    ("labels", "missing"),
    [([0, 0, 0], "no defect images (only 3 normal)"), ([1, 1, 1], "no normal images (only 3 defect)")],
)
@pytest.mark.parametrize("rule", ["f1", "youden", "recall@0.99"])
def test_a_missing_class_is_a_user_error_not_a_minimum_threshold(labels: list[int], missing: str, rule: str) -> None:
    with pytest.raises(UserError, match="validation split") as err:
        choose_threshold([0.2, 0.5, 0.9], labels, rule)
    assert missing in str(err.value)
    assert "data.split" in str(err.value)


def test_empty_validation_is_a_user_error() -> None:
    with pytest.raises(UserError, match="validation split is empty"):
        choose_threshold([], [], "f1")


def test_bad_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="recall@R"):
        choose_threshold([0.2, 0.9], [0, 1], "recall")
