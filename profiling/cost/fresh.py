"""Latency of one model timed in a fresh Python process.

A pruning run that asks "how fast is this candidate?" is a bad place to time it: the training
process holds torch's thread pool, a DataLoader, a heap full of optimizer state, and may have
other work in flight. A fresh interpreter times every candidate on equal terms. The child calls
:func:`profiling.latency.profile_latency` (warm-up, timed runs, the busy-CPU guard, and the runtime
chosen by name from :data:`profiling.latency.RUNTIMES`), so a figure here means what a figure in
the report means.

What is sent: the ONNX file's path (and an int8 file's), and the network itself only when the
runtime needs it (eager, CUDA). The network travels pickled over the child's stdin, as
:func:`profiling.latency.peak_memory_mb` sends its runner: an object of this process handed to its
own child, never a file read from disk.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from torch import nn

from profiling.cost.latency import RUNTIMES, LatencyStats

__all__ = ["latency_in_fresh_process"]

_PREFIX = "latency_stats="


def _child() -> None:
    """The timing process: profile_latency's arguments pickled on stdin, one LatencyStats as JSON on stdout."""
    import warnings

    from profiling.cost.latency import BusyCpuWarning, profile_latency

    args, kwargs = pickle.loads(sys.stdin.buffer.read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BusyCpuWarning)  # the figure comes back with ``skipped`` set instead
        stats = profile_latency(*args, **kwargs)
    print(_PREFIX + json.dumps(asdict(stats[0])))


def latency_in_fresh_process(model_or_onnx: nn.Module | str | os.PathLike[str], img_size: int, runtime: str, *,
                             batch: int = 1, threads: int = 1, warmup: int = 10, runs: int = 30,
                             onnx_path: str | os.PathLike[str] | None = None,
                             onnx_int8_path: str | os.PathLike[str] | None = None, allow_busy: bool = False,
                             max_other_load: float = 0.25, strict: bool = True,
                             timeout_s: float = 600.0) -> LatencyStats:
    """:func:`profiling.latency.profile_latency` of one runtime x batch x thread count, run in a new
    interpreter; the arguments mean the same, but ``strict`` is on by default (the caller, a latency
    search, waits out a busy CPU itself). A figure withheld (busy CPU) or not applicable comes back
    with ``skipped`` set, as there; a child that crashes raises RuntimeError with its stderr."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; valid: {sorted(RUNTIMES)}")
    if not isinstance(model_or_onnx, nn.Module):  # the runners copy a network and set eval mode themselves
        model_or_onnx = Path(model_or_onnx)
    payload = pickle.dumps(((model_or_onnx, img_size, [runtime], [batch], threads, warmup, runs),
                            {"onnx_path": onnx_path, "onnx_int8_path": onnx_int8_path, "allow_busy": allow_busy,
                             "max_other_load": max_other_load, "strict": strict}))
    # A new interpreter rather than multiprocessing: nothing of this process (threads, heap, the
    # __main__ script) is inherited; it finds our packages through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = f"from {__name__} import _child; _child()"
    try:
        done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, env=env,
                              check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timing {runtime} in a fresh process took over {timeout_s:.0f} s") from None
    lines = done.stdout.decode(errors="replace").splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith(_PREFIX):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"timing {runtime} in a fresh process failed (exit {done.returncode}): " + " | ".join(tail))
    return LatencyStats(**json.loads(lines[-1][len(_PREFIX):]))
