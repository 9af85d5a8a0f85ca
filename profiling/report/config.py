"""The ``eval:`` and ``constraints:`` sections: how thresholds are chosen, and what the deployed
model must meet."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.schema import FieldError
from profiling.cost.config import RUNTIME_NAMES

__all__ = ["ConstraintsConfig", "EvalConfig", "parse_threshold_rule"]

_RECALL_RULE = re.compile(r"^recall@(0?\.\d+|1(\.0*)?)$")


def parse_threshold_rule(rule: str) -> tuple[str, float | None]:
    """'f1' -> ('f1', None); 'youden' -> ('youden', None); 'recall@0.99' -> ('recall', 0.99)."""
    if rule in ("f1", "youden"):
        return rule, None
    m = _RECALL_RULE.match(rule)
    if m:
        return "recall", float(m.group(1))
    raise ValueError(f"threshold rule must be 'f1', 'youden' or 'recall@R' (e.g. recall@0.99), got {rule!r}")


@dataclass(frozen=True)
class EvalConfig:
    """How the decision threshold is chosen (on validation, never on test) and how sure we are."""

    threshold: str = "f1"
    bootstrap: int = 1000
    ci: float = 0.95

    def __post_init__(self) -> None:
        try:
            parse_threshold_rule(self.threshold)
        except ValueError as exc:
            raise FieldError("threshold", str(exc).replace("threshold rule ", "")) from None
        if self.bootstrap < 0:
            raise FieldError("bootstrap", f"must be >= 0, got {self.bootstrap}")
        if not 0.5 <= self.ci < 1.0:
            raise FieldError("ci", f"must be in [0.5, 1), got {self.ci}")


@dataclass(frozen=True)
class ConstraintsConfig:
    """What the deployed model must meet; each is checked and shown as pass or fail.

    Latency is the median on ``runtime`` at ``batch`` (an int8 model is timed by its ONNX Runtime
    session, so ``runtime: onnx`` reads its ``onnx_int8`` figure); params and MACs are counts
    (MACs per image, BatchNorm folded away); the quality bounds apply to the test split.
    """

    max_latency_ms: float | None = None
    runtime: str = "onnx"
    batch: int = 1
    max_params: float | None = None
    max_macs: float | None = None
    min_auroc: float | None = None
    min_f1: float | None = None
    min_recall: float | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIME_NAMES:
            raise FieldError("runtime", f"must be one of {list(RUNTIME_NAMES)}, got {self.runtime!r}")
        if self.batch < 1:
            raise FieldError("batch", f"must be >= 1, got {self.batch}")
        for name in ("min_auroc", "min_f1", "min_recall"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise FieldError(name, f"must be in [0, 1] or null, got {value}")
