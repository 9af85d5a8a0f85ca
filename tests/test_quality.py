"""Quality metrics against hand-computed numbers; bootstrap intervals; teacher–student identities."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from core.errors import UserError
from profiling.report.quality import (BOOTSTRAP_METRICS, _resampled_metrics, agreement, binary_metrics, bootstrap_ci, mean_kl, paired_auroc_delta, pr_points, roc_points)

# 3 defects, 5 normals. No score sits on a 15-bin edge (multiples of 1/15), so the ECE is unambiguous.
PROBS = [0.9, 0.5, 0.3, 0.7, 0.5, 0.25, 0.1, 0.45]
LABELS = [1, 1, 1, 0, 0, 0, 0, 0]


def _pairwise_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by definition: the fraction of (defect, normal) pairs ranked right, ties counting half."""
    pos, neg = probs[labels == 1], probs[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _scores(n: int, seed: int, prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(np.int64)
    probs = np.clip(rng.normal(0.3 + 0.35 * labels, 0.2), 0, 1).round(2)  # rounded: plenty of ties
    return probs, labels


def test_metrics_on_a_hand_counted_example() -> None:
    # At 0.5 (defect when >= 0.5; both 0.5s are called defect): tp = {0.9, 0.5}, fn = {0.3},
    # fp = {0.7, 0.5}, tn = {0.25, 0.1, 0.45}.
    m = binary_metrics(PROBS, LABELS, 0.5)
    assert m["confusion_matrix"] == [[3, 2], [1, 2]]
    assert (m["n"], m["n_defect"], m["threshold"]) == (8, 3, 0.5)
    expected = {
        "accuracy": 5 / 8,
        "precision": 2 / 4,
        "recall": 2 / 3,
        "specificity": 3 / 5,
        "balanced_accuracy": (2 / 3 + 3 / 5) / 2,
        "f1": 4 / 7,  # 2tp / (2tp + fp + fn)
        "mcc": (2 * 3 - 2 * 1) / math.sqrt(4 * 3 * 5 * 4),
        # pairs: 0.9 beats all 5; 0.5 beats 0.25, 0.1, 0.45 and ties 0.5; 0.3 beats 0.25, 0.1 -> 10.5 / 15
        "auroc": 10.5 / 15,
        # ranked 0.9 D | 0.7 N | 0.5 D,N | 0.45 N | 0.3 D ...: recall steps of 1/3 at precision 1, 1/2, 1/2
        "auprc": (1 + 0.5 + 0.5) / 3,
        # one bin per score except the two 0.5s (mean 0.5, rate 0.5): sum |prob - label| of the others / 8
        "ece": (0.1 + 0.7 + 0.45 + 0.7 + 0.25 + 0.1) / 8,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-6), name


def test_threshold_is_inclusive() -> None:
    # torchmetrics alone would threshold with ">"; the two 0.5s must count as defect decisions.
    assert binary_metrics(PROBS, LABELS, 0.5)["confusion_matrix"][0][1] == 2
    assert binary_metrics(PROBS, LABELS, 0.5000001)["confusion_matrix"] == [[4, 1], [2, 1]]


def test_auroc_matches_the_pairwise_count_with_ties() -> None:
    probs, labels = _scores(300, seed=1)
    assert binary_metrics(probs, labels, 0.5)["auroc"] == pytest.approx(_pairwise_auroc(probs, labels), abs=1e-6)


@pytest.mark.parametrize(("labels", "undefined"), [([0, 0, 0, 0], "recall"), ([1, 1, 1, 1], "specificity")])
def test_one_class_gives_nan_auroc_and_auprc(labels: list[int], undefined: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torchmetrics "returning zero" warning either
        m = binary_metrics([0.1, 0.4, 0.6, 0.9], labels, 0.5)
    for name in ("auroc", "auprc", "mcc", "balanced_accuracy", undefined):
        assert math.isnan(m[name]), name
    assert m["accuracy"] == 0.5
    intervals = bootstrap_ci([0.1, 0.4, 0.6, 0.9], labels, 0.5, n=10)
    assert sorted(intervals) == ["auroc", "f1"]
    assert all(math.isnan(v) for interval in intervals.values() for v in interval)
    assert all(len(a) == 0 for a in roc_points([0.1, 0.4, 0.6, 0.9], labels))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="logits"):
        binary_metrics([-2.0, 3.0], [0, 1], 0.5)  # torchmetrics would quietly apply a sigmoid
    with pytest.raises(ValueError, match=r"probs\[:, 1\]"):
        binary_metrics(torch.rand(4, 2), [0, 1, 0, 1], 0.5)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        binary_metrics([0.2, 0.8], [0, 2], 0.5)
    with pytest.raises(ValueError, match="match probs"):
        binary_metrics([0.2, 0.8], [0, 1, 1], 0.5)
    with pytest.raises(UserError, match="empty"):
        binary_metrics([], [], 0.5)


def test_vectorised_resample_metrics_match_binary_metrics() -> None:
    probs, labels = _scores(120, seed=2)
    is_defect = labels.astype(bool)
    rng = np.random.default_rng(0)
    draw_pos = rng.integers(0, is_defect.sum(), size=(5, is_defect.sum()))
    draw_neg = rng.integers(0, (~is_defect).sum(), size=(5, (~is_defect).sum()))
    values = _resampled_metrics(probs, is_defect, 0.5, draw_pos, draw_neg, tuple(BOOTSTRAP_METRICS))
    for b in range(5):
        p = np.r_[probs[is_defect][draw_pos[b]], probs[~is_defect][draw_neg[b]]]
        y = np.r_[np.ones(draw_pos.shape[1], dtype=int), np.zeros(draw_neg.shape[1], dtype=int)]
        m = binary_metrics(p, y, 0.5)
        for name in BOOTSTRAP_METRICS:
            assert values[name][b] == pytest.approx(m[name], abs=1e-6), (name, b)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_data() -> None:
    widths = {}
    for size in (100, 1600):
        probs, labels = _scores(size, seed=4)
        point = binary_metrics(probs, labels, 0.5)
        ci = bootstrap_ci(probs, labels, 0.5, n=1000)
        for name in ("auroc", "f1"):
            low, high = ci[name]
            assert low < point[name] < high, (size, name)
        widths[size] = {name: ci[name][1] - ci[name][0] for name in ci}
    for name in ("auroc", "f1"):  # ~1/sqrt(n): 16x the data, about a quarter of the width
        assert widths[1600][name] < 0.4 * widths[100][name], name


def test_bootstrap_is_seeded() -> None:
    probs, labels = _scores(200, seed=5)
    assert bootstrap_ci(probs, labels, 0.5, seed=7) == bootstrap_ci(probs, labels, 0.5, seed=7)
    assert bootstrap_ci(probs, labels, 0.5, seed=7) != bootstrap_ci(probs, labels, 0.5, seed=8)


def test_stratified_resampling_keeps_the_lone_defect_in_every_resample() -> None:
    # Plain resampling would leave the single defect out of about (50/51)^51 = 36% of resamples:
    # AUROC undefined there and recall 0 or undefined. Stratified, it is drawn every time.
    probs = np.r_[0.8, np.linspace(0.05, 0.9, 50)]
    labels = np.r_[1, np.zeros(50, dtype=int)]
    ci = bootstrap_ci(probs, labels, 0.5, metrics=("auroc", "recall", "specificity"), n=500)
    assert ci["recall"] == (1.0, 1.0)
    assert all(np.isfinite(ci["auroc"]))
    assert ci["specificity"][0] < ci["specificity"][1]  # the normals do vary


def test_paired_auroc_delta_is_the_difference_and_pairing_narrows_its_interval() -> None:
    probs, labels = _scores(400, seed=6)
    rng = np.random.default_rng(1)
    other = np.clip(probs + rng.normal(0, 0.05, probs.shape), 0, 1)  # a model that mostly agrees
    d = paired_auroc_delta(other, probs, labels, n=1000)
    exact = binary_metrics(other, labels, 0.5)["auroc"] - binary_metrics(probs, labels, 0.5)["auroc"]
    assert d["delta"] == pytest.approx(exact, abs=1e-12)
    assert d["low"] <= d["delta"] <= d["high"]
    # Both models on the same resamples: the interval of the difference is far narrower than the
    # difference of two independent intervals would suggest.
    single = bootstrap_ci(probs, labels, 0.5, metrics=("auroc",), n=1000)["auroc"]
    assert d["high"] - d["low"] < 0.5 * (single[1] - single[0])
    same = paired_auroc_delta(probs, probs, labels, n=200)
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0, "sd": 0.0}


def test_paired_auroc_delta_without_both_classes_is_nan() -> None:
    d = paired_auroc_delta([0.2, 0.7], [0.3, 0.4], [0, 0], n=10)
    assert all(math.isnan(v) for v in d.values())


def test_unknown_bootstrap_metric_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="auroc"):
        bootstrap_ci(PROBS, LABELS, 0.5, metrics=("auc",))


def test_agreement() -> None:
    a, b = [0.2, 0.6, 0.8], [0.7, 0.4, 0.9]
    assert agreement(a, a, 0.5, 0.5) == 1.0
    assert agreement(a, b, 0.5, 0.5) == pytest.approx(1 / 3)  # decisions 011 vs 101
    assert agreement(a, b, 0.5, 0.35) == pytest.approx(2 / 3)  # 011 vs 111: each model at its own threshold


def test_mean_kl() -> None:
    probs, _ = _scores(100, seed=7)
    assert mean_kl(probs, probs) == 0.0
    # KL([.5, .5] || [.75, .25]) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3); the reverse differs.
    assert mean_kl([0.5], [0.25]) == pytest.approx(0.5 * math.log(4 / 3))
    assert mean_kl([0.25], [0.5]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert mean_kl([0.5, 0.5], [0.5, 0.25]) == pytest.approx(0.25 * math.log(4 / 3))  # a mean over images
    # certain and wrong: clamped at eps = 1e-7, not infinite
    assert mean_kl([1.0], [0.0]) == pytest.approx(math.log(1e7))


def test_curves() -> None:
    probs, labels = _scores(200, seed=8)
    fpr, tpr, _ = roc_points(probs, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(_pairwise_auroc(probs, labels), abs=1e-6)
    precision, recall, thresholds = pr_points(probs, labels)
    assert len(precision) == len(recall) == len(thresholds) + 1
    assert (precision[-1], recall[-1], recall[0]) == (1.0, 0.0, 1.0)
