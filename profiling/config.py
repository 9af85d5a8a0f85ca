"""The ``eval:``, ``profile:`` and ``constraints:`` sections."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from data.schema import FieldError

__all__ = ["EvalConfig", "ProfileConfig", "ConstraintsConfig", "parse_threshold_rule"]

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
class ProfileConfig:
    """How latency is measured."""

    runtimes: list[str] = field(default_factory=lambda: ["eager", "eager_channels_last", "onnx", "onnx_int8"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None  # None: every core
    warmup: int = 10
    runs: int = 30

    def __post_init__(self) -> None:
        if self.runs < 30:
            raise FieldError("runs", f"must be >= 30 for a median and p90 worth quoting, got {self.runs}")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise FieldError("batch_sizes", f"must be a non-empty list of sizes >= 1, got {self.batch_sizes}")


@dataclass(frozen=True)
class ConstraintsConfig:
    """What the deployed model must meet; each is checked and shown as pass or fail."""

    max_latency_ms: float | None = None
    runtime: str = "onnx"
    batch: int = 1
    max_params: float | None = None
    max_macs: float | None = None
    min_auroc: float | None = None
    min_f1: float | None = None
    min_recall: float | None = None
