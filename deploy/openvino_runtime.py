"""Running an exported model on OpenVINO (CPU), the second runtime beside ONNX Runtime.

OpenVINO compiles the exported ONNX file itself (``Core().read_model`` reads ONNX directly) or its
IR (``<model>.xml`` + ``<model>.bin``, saved beside the ONNX file by the export stage with
``export.openvino: true``). Every OpenVINO model of the project is compiled here (export
verification, latency timing, ``predict``), so they all run the same way:

- device ``CPU``, ``PERFORMANCE_HINT: LATENCY`` (one stream, one request at a time: what a
  station that checks one bead after another does);
- ``INFERENCE_NUM_THREADS`` set to the thread count when one is given (a latency figure must say
  how many threads made it, as for ONNX Runtime);
- ``INFERENCE_PRECISION_HINT: f32``: on a CPU with bf16 instructions (AVX512_BF16, AMX) OpenVINO
  otherwise runs in bf16 by default, which is not the fp32 model that was verified.

OpenVINO is an optional package (``pip install -e ".[openvino]"``); without it every function
here raises a :class:`core.errors.UserError` that says so. Like :mod:`deploy.runtime`, this module
needs numpy (and openvino), not torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError

__all__ = ["INSTALL_HINT", "RT_INFO_KEY", "compile_openvino", "ir_metadata", "openvino_logits", "openvino_version",
           "require_openvino", "save_ir"]

INSTALL_HINT = 'pip install -e ".[openvino]"'
#: Where the export metadata (threshold, input size, mean/std, ...) lives in an IR file's rt_info.
RT_INFO_KEY = "sealant_distill"
_MODEL_SUFFIXES = (".onnx", ".xml")


def require_openvino(what: str = "the openvino runtime"):
    """The ``openvino`` module, or a :class:`UserError` that names the install command."""
    try:
        import openvino
    except ImportError:
        raise UserError(f"{what} needs the OpenVINO package, which is not installed: {INSTALL_HINT} "
                        "(or pip install openvino)") from None
    return openvino


def openvino_version() -> str | None:
    """OpenVINO's version where it is installed, else None (for the machine record)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def _read(ov: Any, path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"model '{path}' does not exist; run the export stage first")
    if path.suffix.lower() not in _MODEL_SUFFIXES:
        raise UserError(f"'{path}' is not a model OpenVINO reads here; give an exported .onnx file or an IR .xml file")
    if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
        raise UserError(f"'{path}' has no weights file '{path.with_suffix('.bin').name}' beside it; "
                        "rerun the export stage (--force export)")
    try:
        return ov.Core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises its own RuntimeError variants for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise UserError(f"OpenVINO cannot read '{path}' ({first}); re-export it (--force export)") from None


def compile_openvino(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """The model at ``path`` (.onnx or IR .xml) compiled for the CPU, fp32, latency hint; ``threads``
    inference threads (None: OpenVINO decides)."""
    ov = require_openvino(f"running '{path}' on OpenVINO")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        config["INFERENCE_NUM_THREADS"] = int(threads)
    model = _read(ov, Path(path))
    return ov.Core().compile_model(model, "CPU", config)


def openvino_logits(compiled: Any, batch: np.ndarray) -> np.ndarray:
    """Logits for a batch of normalised NCHW images from a compiled model."""
    return np.asarray(compiled(np.ascontiguousarray(batch, dtype=np.float32))[0])


def save_ir(onnx_path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Convert an exported ONNX file to OpenVINO IR beside it (``model.onnx`` -> ``model.xml`` +
    ``model.bin``), weights kept in fp32, ``metadata`` stored in its rt_info; returns the .xml path.

    Both files are written in a temporary directory and moved into place (the .bin first, so an
    .xml is never there without its weights).
    """
    ov = require_openvino("export.openvino (saving OpenVINO IR)")
    onnx_path = Path(onnx_path)
    model = _read(ov, onnx_path)
    for key, value in (metadata or {}).items():
        model.set_rt_info(json.dumps(value), [RT_INFO_KEY, key])
    xml = onnx_path.with_suffix(".xml")
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".openvino-") as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)  # its default halves the weights to fp16
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)
    return xml


def _onnx_props(path: Path) -> dict[str, Any]:
    import onnx

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key: json.loads(p.value) for p in props}
    except json.JSONDecodeError:
        raise UserError(f"'{path}' has metadata that this project did not write (values are not JSON); "
                        "export it with python -m distill.run ... --stages export") from None
    except Exception as exc:  # onnx raises DecodeError and friends for damaged files
        raise UserError(f"'{path}' cannot be read as an ONNX model ({exc}); rerun the export stage with --force") \
            from None


def ir_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The export metadata of a model OpenVINO reads: an ONNX file's metadata_props or an IR file's
    rt_info, else the JSON twin beside the file (``model.json`` next to ``model.xml``); empty if none."""
    ov = require_openvino(f"reading '{path}'")
    path = Path(path)
    model = _read(ov, path)
    if path.suffix.lower() == ".onnx":
        found = _onnx_props(path)
        if found:
            return found
    elif model.has_rt_info([RT_INFO_KEY]):
        try:
            return {k: json.loads(v.astype(str)) for k, v in model.get_rt_info([RT_INFO_KEY]).astype(dict).items()}
        except json.JSONDecodeError:
            raise UserError(f"'{path}' has metadata that this project did not write (values are not JSON); "
                            "export it with python -m distill.run ... --stages export") from None
    twin = path.with_suffix(".json")
    if twin.is_file():
        try:
            return json.loads(twin.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"'{twin}' is not valid JSON ({exc}); re-export the model (--force export)") from None
    return {}
