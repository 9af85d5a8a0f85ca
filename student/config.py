"""The ``student:``, ``prune:`` and ``export:`` sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.schema import FieldError
from training.config import ModelConfig, TrainConfig

__all__ = ["StudentConfig", "PruneConfig", "ExportConfig"]


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """A small timm CNN (MobileNetV3, EfficientNet) distilled from the teacher."""

    arch: str = "mobilenetv3_large_100"
    lr: float = 1e-3


@dataclass(frozen=True)
class PruneConfig(TrainConfig):
    """Structured pruning to a cost target, each round recovered by distillation.

    ``epochs`` (from TrainConfig) is the final recovery after the last round;
    ``finetune_epochs`` follow each earlier round.
    """

    #: Keep this fraction of the unpruned student's cost: {macs: 0.5} or {params: 0.5}; or run within
    #: {latency_ms: 2.0}, median milliseconds measured on constraints.runtime at constraints.batch
    #: with profile.threads (student/latency_target.py).
    target: dict[str, float] = field(default_factory=lambda: {"macs": 0.5})
    importance: Literal["magnitude", "taylor", "lamp", "fpgm"] = "magnitude"
    global_pruning: bool = False
    round_to: int | None = 8
    #: Prune the squeeze-excitation blocks too (about twice the MAC savings on MobileNetV3-L).
    prune_se: bool = True
    steps: int = 1
    finetune_epochs: int = 1
    epochs: int = 3
    lr: float = 5e-4
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.target) != 1 or next(iter(self.target)) not in ("macs", "params", "latency_ms"):
            raise FieldError("target", "must name one cost, {macs: 0.5}, {params: 0.5} or {latency_ms: 2.0}, "
                                       f"got {self.target}")
        metric, kept = next(iter(self.target.items()))
        if metric == "latency_ms":
            if not kept > 0.0:
                raise FieldError("target", f"latency_ms is the median milliseconds to run within, > 0, got {kept}")
        elif not 0.0 < kept < 1.0:
            raise FieldError("target", f"is the fraction of cost kept, in (0, 1), got {kept}")
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}")
        if self.finetune_epochs < 0:
            raise FieldError("finetune_epochs", f"must be >= 0, got {self.finetune_epochs}")
        if self.round_to is not None and self.round_to < 1:
            raise FieldError("round_to", f"must be >= 1 or null, got {self.round_to}")


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export of the deployed student (and of the others, for comparison)."""

    opset: int = 17
    #: torch.onnx's dynamo exporter (needs onnxscript); the legacy one is faster and proven here.
    dynamo: bool = False
    #: Also build a statically quantized int8 model, calibrated on training images.
    int8: bool = False
    calibration_images: int = 64
    #: Also save OpenVINO IR (<model>.xml + .bin) beside each ONNX file, checked against PyTorch on
    #: OpenVINO (needs pip install -e ".[openvino]"). The check also runs whenever ``openvino`` is
    #: a profile runtime or the constraint's runtime.
    openvino: bool = False
    #: Which finished models to export.
    models: list[Literal["student_pruned", "student", "student_baseline", "teacher"]] = field(
        default_factory=lambda: ["student_pruned", "student", "teacher"]
    )

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise FieldError("opset", f"must be >= 17, got {self.opset}")
        if self.calibration_images < 1:
            raise FieldError("calibration_images", f"must be >= 1, got {self.calibration_images}")
