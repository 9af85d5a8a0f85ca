"""The ``eval:``, ``profile:`` and ``constraints:`` sections."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from data.schema import FieldError

__all__ = ["RUNTIME_NAMES", "ConstraintsConfig", "EvalConfig", "ProfileConfig", "parse_threshold_rule"]

#: The runtimes :data:`profiling.latency.RUNTIMES` can time (named here so a config is checked
#: without importing torch and onnxruntime; a test keeps the two lists equal).
RUNTIME_NAMES: tuple[str, ...] = ("eager", "eager_channels_last", "onnx", "onnx_int8", "cuda_fp16", "cuda_bf16")

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
    #: Time even while other processes load the CPU (the load is recorded beside each figure).
    allow_busy: bool = False
    #: Cores' worth of other processes' CPU time above which a figure is withheld.
    max_other_load: float = 0.25
    #: Measure each runtime's peak inference memory (a fresh process per runtime and batch: seconds each).
    peak_memory: bool = True

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIME_NAMES]
        if unknown or not self.runtimes:
            raise FieldError("runtimes", f"must be a non-empty list from {list(RUNTIME_NAMES)}, got {unknown or '[]'}")
        if self.threads is not None and self.threads < 1:
            raise FieldError("threads", f"must be >= 1 or null (every core), got {self.threads}")
        if self.max_other_load < 0:
            raise FieldError("max_other_load", f"must be >= 0 cores, got {self.max_other_load}")
        if self.runs < 30:
            raise FieldError("runs", f"must be >= 30 for a median and p90 worth quoting, got {self.runs}")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise FieldError("batch_sizes", f"must be a non-empty list of sizes >= 1, got {self.batch_sizes}")


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
