"""The ``teacher:`` section: which ViT, which weights, and its fine-tuning recipe."""

from __future__ import annotations

from dataclasses import dataclass

from core.schema import FieldError
from training.config import ModelConfig

__all__ = ["TeacherConfig"]


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """A timm ViT fine-tuned on the inspection images (plus the loop settings of TrainConfig)."""

    arch: str = "vit_small_patch16_224"
    drop_path: float = 0.1
    #: Layer-wise learning-rate decay for a pretrained ViT (None: off).
    layer_decay: float | None = 0.75
    #: Replace the ViT's patchify stem with stride-2 3x3 convolutions (Xiao et al. 2021, "Early
    #: convolutions help transformers see better"): trains from scratch far more easily. Only for
    #: teachers trained from scratch (pretrained weights expect the patchify stem).
    conv_stem: bool = False
    lr: float = 5e-4
    epochs: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_stem and (self.pretrained or self.weights):
            raise FieldError("conv_stem", "is for a teacher trained from scratch; set teacher.pretrained=false "
                                          "and no teacher.weights, or teacher.conv_stem=false")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise FieldError("layer_decay", f"must be in (0, 1] or null, got {self.layer_decay}")
