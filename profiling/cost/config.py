"""The ``profile:`` section: how latency is measured, and the runtimes it can be measured on."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.schema import FieldError

__all__ = ["RUNTIME_NAMES", "ProfileConfig"]

#: The runtimes :data:`profiling.cost.latency.RUNTIMES` can time (named here so a config is checked
#: without importing torch and onnxruntime; a test keeps the two lists equal).
RUNTIME_NAMES: tuple[str, ...] = (
    "eager", "eager_channels_last", "onnx", "onnx_int8", "openvino", "cuda_fp16", "cuda_bf16",
)


@dataclass(frozen=True)
class ProfileConfig:
    """How latency is measured."""

    runtimes: list[str] = field(default_factory=lambda: ["eager", "eager_channels_last", "onnx", "onnx_int8"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None  # None: every core
    warmup: int = 10
    runs: int = 30
    #: Time at once even while other processes load the CPU, without looking for a quiet window
    #: (the load is recorded beside each figure, which is marked when over ``max_other_load``).
    allow_busy: bool = False
    #: Cores' worth of other processes' CPU time above which the CPU counts as busy: a quiet window
    #: is looked for (a few tries a second apart), else the figure is marked "measured under load".
    max_other_load: float = 0.25
    #: Withhold a figure measured on a busy CPU instead of marking it (the benchmarks' rule).
    strict_timing: bool = False
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
