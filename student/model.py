"""Students: any timm model by name (MobileNetV3, EfficientNet, ...) with its own input view."""

from __future__ import annotations

from data.transforms import model_view
from student.config import StudentConfig
from training.modeling import Classifier
from training.networks import create_network

__all__ = ["build_student"]


def build_student(cfg: StudentConfig) -> Classifier:
    """A two-class timm model; ``student.img_size`` (default: its data config's) sets its view."""
    net = create_network(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights, img_size=cfg.img_size,
                         drop_path=cfg.drop_path, model_kwargs=cfg.model_kwargs, key="student.arch")
    return Classifier(net, model_view(net, cfg.img_size), cfg.arch, cfg.model_kwargs)
