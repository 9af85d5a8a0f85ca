"""Distillation losses: pure functions of tensors, each returning its named terms.

Every loss returns a dict ``{"loss": total, <part>: value, ...}`` so the training step can log
each part. The teacher is never called here: its logits (and patch tokens) come in as tensors
and are detached, so gradients reach only the student (and the feature projector).

- ``kd``: Hinton soft targets, KL(p_T || p_S) at temperature T, ``batchmean``, x T^2, mixed
  with cross-entropy by ``alpha``.
- ``hard``: DeiT hard-label distillation, cross-entropy to the teacher's argmax.
- ``feature``: ``kd`` plus a FitNets-style hint from the teacher's patch tokens to the
  student's last feature map, through an explicit learned 1x1-conv projector.
- ``mixup``: function matching; the teacher and the student see the same mixed batch.

Decoupled KD (Zhao et al. 2022, https://arxiv.org/abs/2203.08679) is deliberately absent: with two classes its non-target term
(KL between the distributions over the non-target classes) is over a single class, hence
zero, and what remains (its target-class term) is ``kd``.

The training step (``distill/steps.py``) calls the teacher and picks the function by
``distill.loss``; the only learned part, the ``feature`` loss's projector, is an explicit
:class:`FeatureProjector` module trained with the student.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "cross_entropy", "kd_loss", "hard_distillation_loss", "feature_loss", "feature_kd_loss", "mixup",
    "FeatureProjector",
]

#: Per-class weights for cross-entropy, e.g. [1.0, 3.0] weighs defect images three times.
ClassWeights = Tensor | Sequence[float] | None


def cross_entropy(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, class_weights: Tensor | None = None
) -> Tensor:
    """Cross-entropy to class indices (B,) or soft / mixed-up targets (B, C), over the labeled
    images only: an index of -1, or a soft row of zeros, marks an unlabeled image, which adds
    nothing (a batch without a labeled image gives 0, with the graph kept).

    Targets y are smoothed to (1 - eps) y + eps / C, then
        CE = sum_i sum_c w_c y_ic (-log p_ic) / sum_i sum_c w_c y_ic,
    a weighted mean over the labeled samples, each weighted by the class weight of its target. With
    one-hot targets this is exactly ``F.cross_entropy(logits, index, weight=w)``, so mixup's targets
    at lam = 1 give the loss of the plain labels; without weights it is the plain mean.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # float32 even outside autocast
    num_classes = logits.shape[-1]
    if targets.dim() == 1:
        targets = F.one_hot(targets.clamp_min(0), num_classes) * (targets >= 0).unsqueeze(1)
    labeled = targets.sum(dim=1, keepdim=True) > 0
    targets = targets.to(log_p) * (1.0 - label_smoothing) + label_smoothing / num_classes * labeled
    if class_weights is not None:
        targets = targets * class_weights.to(log_p)
    total = targets.sum()
    if not bool(labeled.any()):
        return (log_p * 0.0).sum()
    return -(targets * log_p).sum() / total


def _soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_T || p_S), both softened by T, summed over classes and averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    # The soft-target gradient scales as 1/T^2; x T^2 keeps its weight against CE as T changes.
    return kl * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
    alpha: float, label_smoothing: float = 0.0, class_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

        kd   = T^2 * (1/B) sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))
        loss = alpha * kd + (1 - alpha) * CE(z_s, y)
    """
    ce = cross_entropy(student_logits, targets, label_smoothing, class_weights)
    kd = _soft_kl(student_logits, teacher_logits, temperature)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "ce": ce, "kd": kd}


def hard_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 0.5,
    label_smoothing: float = 0.0, class_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Hard-label distillation (DeiT, Touvron et al. 2021, https://arxiv.org/abs/2012.12877).

        hard = CE(z_s, argmax z_t)
        loss = alpha * hard + (1 - alpha) * CE(z_s, y)      (DeiT: alpha = 1/2)

    As in DeiT, label smoothing applies to the true labels only, not to the teacher's.
    """
    ce = cross_entropy(student_logits, targets, label_smoothing, class_weights)
    hard = cross_entropy(student_logits, teacher_logits.argmax(dim=-1), 0.0, class_weights)
    return {"loss": alpha * hard + (1.0 - alpha) * ce, "ce": ce, "hard": hard}


class FeatureProjector(nn.Module):
    """Maps the student's last feature map onto the teacher's patch-token grid.

    Teacher side (no parameters): tokens (B, P + h*w, C_t) -> drop the P prefix tokens (class,
    register; timm's ``num_prefix_tokens``) -> grid (B, C_t, h, w), row-major as timm lays out
    patches -> bilinear resize to the student's (H, W). Student side: a 1x1 conv C_s -> C_t.

    No BatchNorm: the student's map already leaves a BN layer (timm's ``forward_features``),
    the target is normalised per position (see ``feature_loss``), and BN would make the hint
    depend on batch statistics, noisy at the small batches of a CPU run. A linear regressor is
    what FitNets uses. For timm models::

        FeatureProjector(student.num_features, teacher.num_features,
                         teacher.patch_embed.grid_size, teacher.num_prefix_tokens)
    """

    def __init__(
        self, student_channels: int, teacher_channels: int, teacher_grid: tuple[int, int],
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.teacher_grid = (int(teacher_grid[0]), int(teacher_grid[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def teacher_map(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """Patch tokens (B, P + h*w, C_t) -> detached grid (B, C_t, *size)."""
        h, w = self.teacher_grid
        patches = tokens.detach()[:, self.num_prefix_tokens:]
        if patches.shape[1] != h * w:
            raise ValueError(
                f"teacher gave {tokens.shape[1]} tokens; expected {self.num_prefix_tokens} prefix "
                f"+ {h}x{w} patches = {self.num_prefix_tokens + h * w}"
            )
        grid = patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        if (h, w) == tuple(size):
            return grid
        # antialias: when shrinking (14x14 -> 7x7 and the like) average tokens, don't skip them.
        return F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False,
                             antialias=True).to(grid.dtype)

    def forward(self, student_map: Tensor) -> Tensor:
        """Student map (B, C_s, H, W) -> (B, C_t, H, W)."""
        return self.proj(student_map)


def feature_loss(
    student_map: Tensor, teacher_tokens: Tensor, projector: FeatureProjector, normalize: bool = True
) -> Tensor:
    """Hint loss (FitNets, Romero et al. 2015, https://arxiv.org/abs/1412.6550).

        feature = mean over (b, c, y, x) of (proj(F_s) - norm(resize(grid(T))))^2

    ``normalize``: the teacher's target is standardised over channels at each position (a
    LayerNorm without affine, as in "feature distillation", Wei et al. 2022,
    https://arxiv.org/abs/2205.14141). ViT tokens differ in scale between models and carry a
    few very large channels; standardised, the loss is O(1) whatever the teacher, so one
    ``feature_weight`` suits all. The student side is not normalised: the projector learns it.
    """
    projected = projector(student_map)
    target = projector.teacher_map(teacher_tokens, projected.shape[-2:])
    if normalize:
        target = F.layer_norm(target.movedim(1, -1), target.shape[1:2]).movedim(-1, 1)
    return F.mse_loss(projected, target.to(projected.dtype))


def feature_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, student_map: Tensor,
    teacher_tokens: Tensor, projector: FeatureProjector, temperature: float, alpha: float,
    feature_weight: float = 1.0, label_smoothing: float = 0.0,
    class_weights: Tensor | None = None, normalize: bool = True,
) -> dict[str, Tensor]:
    """``kd_loss`` plus the weighted hint:

        loss = alpha * kd + (1 - alpha) * ce + feature_weight * feature
    """
    out = kd_loss(student_logits, teacher_logits, targets, temperature, alpha,
                  label_smoothing, class_weights)
    feature = feature_loss(student_map, teacher_tokens, projector, normalize)
    out["loss"] = out["loss"] + feature_weight * feature
    out["feature"] = feature
    return out


def mixup(
    images: Tensor, targets: Tensor, alpha: float, generator: torch.Generator, num_classes: int = 2,
    also: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, Tensor | None]:
    """Mixup (Zhang et al. 2018, https://arxiv.org/abs/1710.09412) for function matching
    (Beyer et al. 2022, https://arxiv.org/abs/2106.05237).

        lam ~ Beta(alpha, alpha),  x' = lam x + (1 - lam) x[perm],  y' = lam y + (1 - lam) y[perm]

    Give the teacher and the student the same mix: mixed images are borderline inputs on which
    the teacher's soft outputs carry information, which with two classes plain soft targets
    barely do. ``also`` (the teacher's own view of the same images, at its resolution) is mixed
    with the same ``lam`` and ``perm``. ``lam`` and ``perm`` come from ``generator`` only (same
    generator state, same mix; the global RNG is untouched). Targets are indices (B,), one-hot
    encoded with ``num_classes`` (-1: unlabeled), or soft (B, C); the returned targets are always
    soft (B, C), with a row of zeros wherever either image of a mix was unlabeled: a label only
    half known is not a label.

    ``alpha == 0`` turns mixing off: the images come back unchanged, targets one-hot, lam = 1,
    and the generator is not advanced.
    """
    if alpha < 0:
        raise ValueError(f"mixup alpha must be >= 0 (0 turns it off), got {alpha}")
    if targets.dim() == 1:
        soft = F.one_hot(targets.clamp_min(0), num_classes).float() * (targets >= 0).unsqueeze(1)
    else:
        soft = targets.float()
    if alpha == 0:
        return images, soft, 1.0, also
    # torch's Beta sampler takes no generator; seed Python's from it so the draw is reproducible.
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    lam = random.Random(seed).betavariate(alpha, alpha)
    perm = torch.randperm(images.shape[0], generator=generator, device=generator.device)
    labeled = soft.sum(dim=1) > 0
    both = (labeled & labeled[perm.to(labeled.device)]).unsqueeze(1)
    mixed_targets = (lam * soft + (1.0 - lam) * soft[perm.to(soft.device)]) * both
    mixed = lam * images + (1.0 - lam) * images[perm.to(images.device)]
    mixed_also = None if also is None else lam * also + (1.0 - lam) * also[perm.to(also.device)]
    return mixed, mixed_targets, lam, mixed_also
