"""Loss identities and hand-computed values for distill/losses.py (CPU, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import (
    FeatureProjector, cross_entropy, feature_kd_loss, feature_loss, hard_distillation_loss, kd_loss, mixup,
)

LN3 = math.log(3.0)


# ---- cross-entropy ---------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_one_hot_targets_equal_index_targets_and_torch(smoothing: float) -> None:
    logits = torch.randn(6, 3)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    ours = cross_entropy(logits, index, label_smoothing=smoothing)
    soft = cross_entropy(logits, F.one_hot(index, 3).float(), label_smoothing=smoothing)
    torch_ce = F.cross_entropy(logits, index, label_smoothing=smoothing)
    assert torch.allclose(ours, torch_ce, atol=1e-6)
    assert torch.allclose(soft, torch_ce, atol=1e-6)


def test_class_weights_by_hand() -> None:
    # p(sample 0) = softmax([0, 0]) = [1/2, 1/2], label 0: -ln(1/2) = 0.693147
    # p(sample 1) = softmax([ln 3, 0]) = [3/4, 1/4], label 1: -ln(1/4) = 1.386294
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    targets = torch.tensor([0, 1])
    assert cross_entropy(logits, targets).item() == pytest.approx((0.693147 + 1.386294) / 2, abs=1e-5)
    # weights [1, 3]: (1 * 0.693147 + 3 * 1.386294) / (1 + 3) = 1.213008
    weights = torch.tensor([1.0, 3.0])
    weighted = cross_entropy(logits, targets, class_weights=weights)
    assert weighted.item() == pytest.approx(1.213008, abs=1e-5)
    assert torch.allclose(weighted, F.cross_entropy(logits, targets, weight=weights))
    # One-hot (as mixup gives with lam = 1) is weighted the same as indices.
    one_hot = cross_entropy(logits, F.one_hot(targets, 2).float(), class_weights=weights)
    assert one_hot.item() == pytest.approx(1.213008, abs=1e-5)


def test_mixed_targets_cross_entropy() -> None:
    # y = [0.3, 0.7], p = [3/4, 1/4]: -(0.3 ln 0.75 + 0.7 ln 0.25) = 0.0863046 + 0.9704061
    logits = torch.tensor([[LN3, 0.0]])
    assert cross_entropy(logits, torch.tensor([[0.3, 0.7]])).item() == pytest.approx(1.056711, abs=1e-5)


# ---- kd ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kd_is_zero_for_equal_logits(temperature: float) -> None:
    logits = torch.randn(5, 2) * 3
    out = kd_loss(logits, logits.clone(), torch.randint(0, 2, (5,)), temperature, alpha=0.5)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_kd_hand_computed() -> None:
    # Sample 0: student [0, 0] -> p_S = [1/2, 1/2]; teacher [2 ln 3, 0] / T=2 -> p_T = [3/4, 1/4].
    #   KL(p_T || p_S) = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812
    # Sample 1: student [1, 1], teacher [2, 2]: both uniform, KL = 0.
    #   kd = T^2 * (0.130812 + 0) / 2 = 4 * 0.065406 = 0.261624          (batchmean: / B = 2)
    # CE: sample 0, label 0: ln 2; sample 1, label 1: ln 2 -> ce = 0.693147
    # loss = 0.5 * 0.261624 + 0.5 * 0.693147 = 0.477386
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[2 * LN3, 0.0], [2.0, 2.0]])
    out = kd_loss(student, teacher, torch.tensor([0, 1]), temperature=2.0, alpha=0.5)
    assert set(out) == {"loss", "ce", "kd"}
    assert out["kd"].item() == pytest.approx(0.261624, abs=1e-5)
    assert out["ce"].item() == pytest.approx(0.693147, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.477386, abs=1e-5)


def test_kd_matches_formula_at_two_temperatures() -> None:
    student, teacher = torch.randn(8, 2), torch.randn(8, 2) * 2
    targets = torch.randint(0, 2, (8,))
    for t in (1.0, 3.0):
        p_t, p_s = F.softmax(teacher / t, -1), F.softmax(student / t, -1)
        expected = t**2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        got = kd_loss(student, teacher, targets, t, alpha=1.0)["kd"]
        assert torch.allclose(got, expected, atol=1e-6)


def test_t_squared_keeps_gradient_scale_at_large_t() -> None:
    # d(T^2 KL)/dz_s = T (p_S - p_T) / B  ->  (z_s - z_t, centred) / (C B) as T grows: T-independent.
    # Without the T^2 it would shrink as 1/T^2 (a factor 4 between these two temperatures).
    student, teacher = torch.randn(4, 2), torch.randn(4, 2)
    norms = []
    for t in (50.0, 100.0):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, torch.zeros(4, dtype=torch.long), t, alpha=1.0)["loss"].backward()
        norms.append(z.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=1e-2)
    assert norms[0] > 1e-3


def test_alpha_ends_are_pure_ce_and_pure_kd() -> None:
    student, teacher = torch.randn(6, 2), torch.randn(6, 2)
    targets = torch.randint(0, 2, (6,))
    ce = F.cross_entropy(student, targets, label_smoothing=0.1)
    p_t, p_s = F.softmax(teacher / 4, -1), F.softmax(student / 4, -1)
    kd = 16 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    at0 = kd_loss(student, teacher, targets, 4.0, alpha=0.0, label_smoothing=0.1)["loss"]
    at1 = kd_loss(student, teacher, targets, 4.0, alpha=1.0, label_smoothing=0.1)["loss"]
    assert torch.allclose(at0, ce, atol=1e-6)
    assert torch.allclose(at1, kd, atol=1e-6)


# ---- hard -------------------------------------------------------------------------------------

def test_hard_loss_when_teacher_disagrees_with_label() -> None:
    # Student [2, 0], label 0, teacher [0, 3] -> teacher says 1.
    #   ce   = -ln softmax([2, 0])[0] = ln(1 + e^-2) = 0.126928
    #   hard = -ln softmax([2, 0])[1] = ln(1 + e^2)  = 2.126928
    #   loss = (0.126928 + 2.126928) / 2 = 1.126928
    out = hard_distillation_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([0]))
    assert set(out) == {"loss", "ce", "hard"}
    assert out["ce"].item() == pytest.approx(0.126928, abs=1e-5)
    assert out["hard"].item() == pytest.approx(2.126928, abs=1e-5)
    assert out["loss"].item() == pytest.approx(1.126928, abs=1e-5)


def test_hard_loss_smooths_true_labels_only() -> None:
    student, teacher = torch.randn(5, 2), torch.randn(5, 2)
    targets = torch.randint(0, 2, (5,))
    out = hard_distillation_loss(student, teacher, targets, label_smoothing=0.1)
    assert torch.allclose(out["ce"], F.cross_entropy(student, targets, label_smoothing=0.1))
    assert torch.allclose(out["hard"], F.cross_entropy(student, teacher.argmax(-1)))


# ---- feature hint -----------------------------------------------------------------------------

def test_projector_non_square_grid_and_prefix_token() -> None:
    h, w, c_t = 3, 5, 4
    proj = FeatureProjector(student_channels=6, teacher_channels=c_t, teacher_grid=(h, w), num_prefix_tokens=1)
    tokens = torch.randn(2, 1 + h * w, c_t)
    tokens[:, 0] = 1e6  # the class token must not leak into the grid
    grid = proj.teacher_map(tokens, (h, w))
    assert grid.shape == (2, c_t, h, w)
    # Row-major patches: token 1 + i * w + j sits at (i, j). A (w, h) mix-up fails here.
    for i, j in [(0, 0), (0, 4), (2, 0), (1, 3)]:
        assert torch.equal(grid[:, :, i, j], tokens[:, 1 + i * w + j])
    resized = proj.teacher_map(tokens, (2, 4))
    assert resized.shape == (2, c_t, 2, 4) and resized.abs().max() < 100
    assert proj(torch.randn(2, 6, 2, 4)).shape == (2, c_t, 2, 4)
    with pytest.raises(ValueError, match="1 prefix"):
        proj.teacher_map(torch.randn(2, h * w, c_t), (2, 4))  # forgot the class token


def test_projector_shrinking_uses_every_token() -> None:
    # 6x6 -> 2x2: plain bilinear would sample only tokens 1 and 4 of each row and column;
    # the antialiased resize averages all of them, so an impulse at (0, 0) must show up.
    proj = FeatureProjector(1, 1, (6, 6))
    tokens = torch.zeros(1, 36, 1)
    tokens[0, 0, 0] = 1.0
    assert proj.teacher_map(tokens, (2, 2))[0, 0, 0, 0] > 0.01


def test_feature_loss_by_formula() -> None:
    proj = FeatureProjector(3, 4, (2, 2), num_prefix_tokens=0)
    student_map, tokens = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4) * 10 + 5
    target = tokens.transpose(1, 2).reshape(2, 4, 2, 2)
    raw = feature_loss(student_map, tokens, proj, normalize=False)
    assert torch.allclose(raw, ((proj(student_map) - target) ** 2).mean())
    mean, std = target.mean(1, keepdim=True), target.var(1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    normed = feature_loss(student_map, tokens, proj, normalize=True)
    assert torch.allclose(normed, ((proj(student_map) - (target - mean) / std) ** 2).mean(), atol=1e-5)


class _TinyStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(x)
        return self.head(fmap.mean((2, 3))), fmap


def test_gradients_reach_only_student_and_projector() -> None:
    student = _TinyStudent()
    logits, fmap = student(torch.randn(2, 3, 16, 16))  # fmap: 4x4
    teacher_logits = torch.randn(2, 2, requires_grad=True)
    teacher_tokens = torch.randn(2, 1 + 2 * 3, 8, requires_grad=True)  # non-square 2x3 grid
    projector = FeatureProjector(6, 8, (2, 3), num_prefix_tokens=1)
    out = feature_kd_loss(logits, teacher_logits, torch.tensor([0, 1]), fmap, teacher_tokens, projector,
                          temperature=2.0, alpha=0.5, feature_weight=0.5)
    assert set(out) == {"loss", "ce", "kd", "feature"}
    out["loss"].backward()
    assert teacher_logits.grad is None and teacher_tokens.grad is None
    for module in (student.body, student.head, projector):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_feature_kd_adds_weighted_hint_to_kd() -> None:
    proj = FeatureProjector(3, 4, (2, 2))
    s_logits, t_logits, y = torch.randn(2, 2), torch.randn(2, 2), torch.tensor([1, 0])
    fmap, tokens = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4)
    out = feature_kd_loss(s_logits, t_logits, y, fmap, tokens, proj, temperature=3.0, alpha=0.7,
                          feature_weight=2.0)
    base = kd_loss(s_logits, t_logits, y, 3.0, 0.7)["loss"]
    assert torch.allclose(out["loss"], base + 2.0 * feature_loss(fmap, tokens, proj))


# ---- mixup ------------------------------------------------------------------------------------

def test_mixup_is_reproducible_and_consistent() -> None:
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)  # sample i is all i
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    global_state = torch.get_rng_state()
    a = mixup(images, targets, 0.4, torch.Generator().manual_seed(7))
    b = mixup(images, targets, 0.4, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state)  # only the given generator is used
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    mixed, soft, lam, _ = a
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(soft.sum(1), torch.ones(6))
    # Recover the partner of each image and check the targets were mixed with the same one.
    partner = ((mixed[:, 0, 0, 0] - lam * torch.arange(6.0)) / (1 - lam)).round().long()
    assert sorted(partner.tolist()) == list(range(6))
    one_hot = F.one_hot(targets, 2).float()
    assert torch.allclose(soft, lam * one_hot + (1 - lam) * one_hot[partner], atol=1e-6)
    lams = {mixup(images, targets, 0.4, torch.Generator().manual_seed(s))[2] for s in range(5)}
    assert len(lams) == 5


def test_mixup_alpha_zero_is_off() -> None:
    images, targets = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    mixed, soft, lam, _ = mixup(images, targets, 0.0, gen)
    assert lam == 1.0 and torch.equal(mixed, images)
    assert torch.equal(soft, F.one_hot(targets, 2).float())
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match=">= 0"):
        mixup(images, targets, -1.0, gen)
