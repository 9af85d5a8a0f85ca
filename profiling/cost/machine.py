"""The machine a latency figure was measured on, and whether anything else was using its CPU.

A latency means little without the CPU model, the cores this process may use, the thread count
and the library versions beside it (:func:`machine_info`); and timing on a CPU that other
processes are using is worse than no figure, so :func:`other_cpu_load` reads how many cores
others kept busy (from /proc, Linux only).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

__all__ = [
    "LOAD_SAMPLE_S",
    "CpuTimes",
    "cpu_model",
    "cpu_times",
    "machine_info",
    "other_cpu_load",
    "other_load",
    "usable_cores",
]

LOAD_SAMPLE_S = 0.5  # how long the CPU is watched before a measurement starts


# --- is anybody else using the CPU? ----------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks from /proc: on the CPUs this process may use, and by this process itself."""

    busy: int  # not idle, including time stolen by other virtual machines
    total: int
    cpus: int
    own: int  # user + system time of this process, all threads


def cpu_times() -> CpuTimes | None:
    """A reading of /proc/stat and /proc/self/stat; None where there is no /proc (not Linux)."""
    try:
        stat = Path("/proc/stat").read_text()
        own_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    usable = os.sched_getaffinity(0)
    busy = total = cpus = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in usable):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        ticks = [int(f) for f in fields[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
        cpus += 1
    utime, stime = int(own_fields[11]), int(own_fields[12])  # fields 14 and 15 of proc(5)
    return CpuTimes(busy=busy, total=total, cpus=cpus, own=utime + stime)


def other_load(before: CpuTimes, after: CpuTimes) -> float:
    """Cores' worth of time other processes (and other VMs, via steal) used between two readings."""
    elapsed_per_cpu = (after.total - before.total) / max(after.cpus, 1)
    if elapsed_per_cpu <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(others, 0) / elapsed_per_cpu


def other_cpu_load(interval: float = LOAD_SAMPLE_S) -> float | None:
    """Cores other processes keep busy, watched for ``interval`` seconds; None where it cannot be read."""
    before = cpu_times()
    time.sleep(interval)
    after = cpu_times()
    return None if before is None or after is None else other_load(before, after)


# --- the machine ------------------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which is what ``threads=None`` means."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What a latency figure depends on, to be stored beside it."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "openvino": _version("openvino"),
        "timm": _version("timm"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
    }
