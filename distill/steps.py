"""Training steps: a batch in, a dict of named losses out. The teacher is called here, not in a loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from core.errors import UserError
from distill.config import DistillConfig
from distill.losses import FeatureProjector, cross_entropy, feature_kd_loss, hard_distillation_loss, kd_loss, mixup
from distill.teacher_cache import TeacherCache
from training.engine import Batch
from training.modeling import Classifier

__all__ = ["StudentTrainee", "ce_step", "distill_step", "make_projector"]


class StudentTrainee(nn.Module):
    """What the distillation stage trains: the student, plus the feature projector when the
    hint loss is on (its weights are learned with the student, and thrown away afterwards)."""

    def __init__(self, student: Classifier, projector: FeatureProjector | None = None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.projector is None:
            return self.student(x), None
        fmap = self.student.forward_features(x)
        return self.student.net.forward_head(fmap), fmap


def make_projector(student: Classifier, teacher: Classifier) -> FeatureProjector:
    """Size the projector from real shapes (a pruned student's ``num_features`` is stale)."""
    was_training = student.training
    with torch.no_grad():
        probe = torch.zeros(1, 3, student.img_size, student.img_size)
        s_channels = student.eval().forward_features(probe).shape[1]
        t_tokens = teacher.eval().forward_features(torch.zeros(1, 3, teacher.img_size, teacher.img_size))
    student.train(was_training)
    patch_embed = getattr(teacher.net, "patch_embed", None)
    if t_tokens.dim() != 3 or patch_embed is None or not hasattr(patch_embed, "grid_size"):
        raise UserError(f"distill.loss=feature needs a ViT teacher with patch tokens; '{teacher.arch}' gives "
                        f"features of shape {tuple(t_tokens.shape)}. Use distill.loss=kd")
    grid = tuple(patch_embed.grid_size)
    prefix = int(getattr(teacher.net, "num_prefix_tokens", 1))
    return FeatureProjector(s_channels, t_tokens.shape[-1], grid, prefix)


def ce_step(label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None, *, mixup_alpha: float = 0.0,
            generator: torch.Generator | None = None) -> Callable:
    """Plain supervised step (the teacher, and the from-scratch baseline student).

    ``mixup_alpha`` > 0 mixes the batch and its labels as :func:`distill_step` does: the baseline
    keeps the distilled student's mixup, so the two differ by the teacher alone.
    """
    gen = generator or torch.Generator().manual_seed(0)

    def step(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        images, targets = batch[0], batch[1]
        if mixup_alpha > 0:
            images, targets, _, _ = mixup(images, targets, mixup_alpha, gen)
        out = model(images)
        logits = out[0] if isinstance(out, tuple) else out
        weights = class_weights.to(logits.device) if class_weights is not None else None
        return {"loss": cross_entropy(logits, targets, label_smoothing, weights)}

    return step


def distill_step(teacher: Classifier, cfg: DistillConfig, *, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, cache: TeacherCache | None = None,
                 generator: torch.Generator | None = None) -> Callable:
    """The student's step: teacher outputs (live, or from the cache), then the chosen loss.

    The teacher scores its own view of each image when the batch carries one (a fifth element: the
    same augmented image at the teacher's resolution), else the student's. With ``distill.mixup``
    > 0, teacher and student see the same mix (function matching). Unlabeled images (label -1)
    reach only the distillation term: the cross-entropy counts labeled images only.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = generator or torch.Generator().manual_seed(0)

    def step(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        images, labels, index, views = batch[:4]
        teacher_images = batch[4] if len(batch) > 4 else images
        targets: torch.Tensor = labels
        if cfg.mixup > 0:
            images, targets, _, mixed = mixup(images, labels, cfg.mixup, gen, also=batch[4] if len(batch) > 4 else None)
            teacher_images = images if mixed is None else mixed
        tokens = None
        if cache is not None:
            t_logits = cache.lookup(index, views).to(images.device)
        else:
            with torch.no_grad():
                if cfg.loss == "feature":
                    tokens = teacher.forward_features(teacher_images)
                    t_logits = teacher.net.forward_head(tokens)
                else:
                    t_logits = teacher(teacher_images)
        s_logits, fmap = model(images)
        weights = class_weights.to(s_logits.device) if class_weights is not None else None
        if cfg.loss == "kd":
            return kd_loss(s_logits, t_logits, targets, cfg.temperature, cfg.alpha, label_smoothing, weights)
        if cfg.loss == "hard":
            return hard_distillation_loss(s_logits, t_logits, targets, cfg.alpha, label_smoothing, weights)
        projector = model.module.projector if hasattr(model, "module") else model.projector
        return feature_kd_loss(s_logits, t_logits, targets, fmap, tokens, projector, cfg.temperature, cfg.alpha,
                               cfg.feature_weight, label_smoothing, weights)

    return step
