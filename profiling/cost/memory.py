"""Peak inference memory: how much one call of a model needs beyond its weights, per runtime.

A fresh Python process per measurement (its resident-set high-water mark reset just before the
call), because torch and ONNX Runtime allocate outside Python and a long-lived process would
reuse freed memory unseen.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["peak_memory_mb"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


_PEAK_PREFIX = "peak_rss_growth_mb="


def _peak_rss_child() -> None:
    """The measuring process: (threads, runner) pickled on stdin, RSS growth of one call on stdout."""
    threads, fn = pickle.loads(sys.stdin.buffer.read())
    torch.set_num_threads(threads)
    gc.collect()
    try:  # hand freed heap back to the OS, so the call cannot reuse it unseen (glibc only)
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kb("VmRSS")
    fn()
    print(f"{_PEAK_PREFIX}{(_status_kb('VmHWM') - before) * 1024 / 1e6!r}")


def peak_memory_mb(fn: Callable[[], Any], *, device: str = "cpu") -> float:
    """Extra memory one call of ``fn`` needs at its peak, in MB (10⁶ bytes); weights not included.

    CUDA: growth of ``torch.cuda.max_memory_allocated`` over what was allocated before the call
    (tensors only, not the caching allocator's reserve or the CUDA context).
    CPU: ``fn`` must be picklable (:class:`EagerRunner`, :class:`OnnxRunner`). It is loaded in a
    fresh Python process, whose resident-set high-water mark is then reset, and called once: the
    result is peak RSS minus RSS before the call, i.e. activations, workspaces, allocator arenas
    and one-time kernel caches of a first inference. tracemalloc cannot be used: torch and ONNX
    Runtime allocate outside Python. A fresh process, not this one: here freed memory from
    earlier calls would be reused unseen.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("peak CPU memory needs Linux /proc (to reset and read the RSS high-water mark)")
    try:
        payload = pickle.dumps((torch.get_num_threads(), fn))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            "peak CPU memory runs fn in a fresh process, so fn must be picklable "
            f"(EagerRunner, OnnxRunner; not a lambda or closure): {exc}"
        ) from exc
    # A new interpreter rather than multiprocessing: nothing of this process (heap, thread pools,
    # the __main__ script) is inherited or re-run; it finds our packages through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = f"from {__name__} import _peak_rss_child; _peak_rss_child()"
    done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, env=env, check=False)
    lines = done.stdout.decode(errors="replace").splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith(_PEAK_PREFIX):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"peak memory measurement failed (exit {done.returncode}): " + " | ".join(tail))
    return float(lines[-1][len(_PEAK_PREFIX) :])
