"""Running an exported model: ONNX Runtime sessions, logits, and the defect probability.

Every ONNX Runtime session of the project is built here (export verification, the int8 model's
predictions, latency timing, ``predict``), so they all run the same way: CPU provider, and when a
thread count is given, exactly that many intra-op threads with sequential execution (a latency
figure must say how many threads made it). This module needs numpy and onnxruntime only, not
torch: a PC beside the line runs ``predict`` on an ONNX file without the training stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from data import DEFECT

__all__ = ["defect_probability", "onnx_logits", "onnx_metadata", "onnx_session"]


def session_options(threads: int | None = None):
    """ONNX Runtime session options: ``threads`` intra-op threads, sequential (None: ONNX Runtime decides)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads  # 0 would mean "ORT decides": a timing would not say how many
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def onnx_session(path: str | os.PathLike[str], threads: int | None = None):
    """An ONNX Runtime CPU session with :func:`session_options`."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model '{path}' does not exist; run the export stage first")
    options = session_options(threads)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise UserError(f"ONNX Runtime cannot load '{path}' ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                        "re-export it (rerun the export stage with --force export)") from None


def onnx_metadata(session: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata our export stored in the file (values are JSON text)."""
    try:
        return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    except json.JSONDecodeError:
        raise UserError(f"'{path}' has metadata that this project did not write (values are not JSON); "
                        "export it with python -m distill.run ... --stages export") from None


def onnx_logits(session: Any, batch: np.ndarray) -> np.ndarray:
    """Logits for a batch of normalised NCHW images."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def defect_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax probability of the *defect* class for (N, 2) logits, computed stably."""
    logits = np.asarray(logits, dtype=np.float64)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z[:, DEFECT] / z.sum(axis=1)
