"""Students (timm CNNs), structured pruning with torch-pruning, safe saving, ONNX export."""

from student.config import ExportConfig, PruneConfig, StudentConfig
from student.model import build_student

__all__ = ["StudentConfig", "PruneConfig", "ExportConfig", "build_student"]
