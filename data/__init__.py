"""Image sources, scanning and validation, splits, leakage checks, transforms and loaders."""

#: Index 0 is the negative class, index 1 the positive one: every metric's "positive" is a defect.
CLASS_NAMES: tuple[str, str] = ("normal", "defect")
NORMAL, DEFECT = 0, 1

__all__ = ["CLASS_NAMES", "NORMAL", "DEFECT"]
