"""Building the ViT teacher (timm, hub or local weights) and its fine-tuning recipe."""

from teacher.config import TeacherConfig
from teacher.model import build_teacher, teacher_optimizer

__all__ = ["TeacherConfig", "build_teacher", "teacher_optimizer"]
