"""ONNX export of a trained network, its check against PyTorch, and optional static int8.

The exported graph takes *normalised* NCHW float32 images (batch dynamic) and returns logits;
resizing and mean/std normalisation are left to the caller, whose recipe travels with the
model: metadata (decision threshold, class names, input size, mean/std, arch, ...) is written
into the ONNX file's ``metadata_props`` and into a JSON file beside it (``model.json`` next to
``model.onnx``), so inference needs no config. Values are stored as JSON text in the ONNX file,
so :func:`read_metadata` gives back numbers and lists, not strings. A model trained on tiles
(``data.tiles``) carries its tiling under ``tiles`` (grid or size, overlap, tiles per image, and the
image-level threshold: an image is a defect when its worst tile scores at least that), so
``python -m deploy.predict`` cuts a whole image the same way (:func:`read_tiles`).

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from core.errors import UserError
from core.files import atomic_write
from deploy.runtime import defect_probability, onnx_logits, onnx_session
from training.modeling import eval_mode

__all__ = ["INPUT", "OUTPUT", "export_onnx", "update_metadata", "quantize_int8", "read_metadata", "read_tiles",
           "verify_onnx", "verify_openvino"]

INPUT, OUTPUT = "input", "logits"


def _finish(model: onnx.ModelProto, path: Path, metadata: dict[str, Any]) -> Path:
    """Stamp ``metadata`` into the model, check it, and write it and its JSON twin atomically."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model)
    text = json.dumps(metadata, indent=2, default=float)
    atomic_write(path.with_suffix(".json"), lambda p: p.write_text(text, encoding="utf-8"))
    atomic_write(path, lambda p: onnx.save(model, str(p)))
    return path


def export_onnx(net: nn.Module, path: str | os.PathLike[str], img_size: int, *, opset: int = 17,
                dynamo: bool = False, metadata: dict[str, Any] | None = None) -> Path:
    """Export ``net`` (normalised images in, logits out) to ``path`` with a dynamic batch axis.

    The legacy TorchScript exporter (``dynamo=False``) takes under a second here; the dynamo one
    takes ~10 s, needs onnxscript, and may raise the opset (asked for 17, it writes 18): the
    opset actually written is in the metadata. ``metadata`` values must be JSON-serialisable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(net.parameters())
    # Batch 2, not 1: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    names = {"input_names": [INPUT], "output_names": [OUTPUT]}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp, eval_mode(net):
        raw = Path(tmp) / "raw.onnx"
        if dynamo:
            try:
                import onnxscript  # noqa: F401  (torch imports it lazily, with a bare ModuleNotFoundError)
            except ImportError as exc:
                raise UserError("export.dynamo: true needs the onnxscript package: pip install onnxscript, "
                                "or set export.dynamo=false (the legacy exporter)") from exc
            torch.onnx.export(net, (example,), str(raw), dynamo=True, opset_version=opset, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names)
        else:
            with warnings.catch_warnings():  # its deprecation notice: chosen knowingly (see docstring)
                warnings.simplefilter("ignore", DeprecationWarning)
                # timm's ViTs assert input sizes with Python ints; traced as constants, which is right
                # for a model exported at one input size.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(net, (example,), str(raw), dynamo=False, opset_version=opset,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, **names)
        model = onnx.load(str(raw))
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta = {"img_size": img_size, "input": INPUT, "output": OUTPUT, "layout": "NCHW, normalised",
            "opset": written, "exporter": "dynamo" if dynamo else "legacy", "precision": "fp32",
            **(metadata or {})}
    return _finish(model, path, meta)


def _load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model '{path}' does not exist; run the export stage first")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends for damaged files
        raise UserError(f"'{path}' cannot be read as an ONNX model ({exc}); "
                        "rerun the export stage with --force") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata stored in an ONNX model by :func:`export_onnx` / :func:`quantize_int8`."""
    props = _load(path).metadata_props
    try:
        return {p.key: json.loads(p.value) for p in props}
    except json.JSONDecodeError:
        raise UserError(f"'{path}' has metadata that this project did not write (values are not JSON); "
                        "export it with deploy.export.export_onnx") from None


def read_tiles(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The tiling an exported model was trained with (``grid``, ``size``, ``overlap``,
    ``tiles_per_image``, ``threshold`` at image level), or None for a model of whole images."""
    return read_metadata(path).get("tiles")


def update_metadata(path: str | os.PathLike[str], changes: dict[str, Any]) -> dict[str, Any]:
    """Change metadata values of an exported model (and its JSON twin); returns the new metadata.

    Used when a value is only known after export, e.g. the int8 model's own decision threshold,
    chosen on validation from its own outputs.
    """
    meta = {**read_metadata(path), **changes}
    _finish(_load(path), Path(path), meta)
    return meta


def verify_onnx(path: str | os.PathLike[str], net: nn.Module, images: torch.Tensor, threshold: float,
                *, batch_size: int = 32) -> dict[str, float | int]:
    """Run the ONNX model (ONNX Runtime) and ``net`` on the same normalised images and compare them.

    Returns the largest absolute difference of defect probabilities and of logits, and the
    fraction of images whose decision (defect when prob >= threshold) is the same in both.
    """
    _check_images(images)
    session = onnx_session(path)
    return _compare(lambda chunk: onnx_logits(session, chunk), net, images, threshold, batch_size)


def verify_openvino(path: str | os.PathLike[str], net: nn.Module, images: torch.Tensor, threshold: float,
                    *, batch_size: int = 32) -> dict[str, float | int | str]:
    """:func:`verify_onnx` with the model (.onnx or IR .xml) compiled by OpenVINO on the CPU, fp32,
    as :func:`deploy.openvino_runtime.compile_openvino` compiles it everywhere; the same figures,
    plus the OpenVINO version. Without the openvino package: a UserError naming the install command."""
    from deploy.openvino_runtime import compile_openvino, openvino_logits, openvino_version

    _check_images(images)
    compiled = compile_openvino(path)
    result = _compare(lambda chunk: openvino_logits(compiled, chunk), net, images, threshold, batch_size)
    return {**result, "openvino": openvino_version() or ""}


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty NCHW batch, got shape {tuple(images.shape)}")


def _compare(logits_of: Callable[[np.ndarray], np.ndarray], net: nn.Module, images: torch.Tensor, threshold: float,
             batch_size: int) -> dict[str, float | int]:
    """``net``'s logits against ``logits_of``'s (a runtime's) on the same images, chunk by chunk."""
    device = next(net.parameters()).device
    torch_logits, runtime_out = [], []
    with eval_mode(net), torch.no_grad():
        for chunk in images.split(batch_size):
            torch_logits.append(net(chunk.to(device)).float().cpu().numpy())
            runtime_out.append(logits_of(chunk.cpu().numpy()))
    ref, got = np.concatenate(torch_logits), np.concatenate(runtime_out)
    p_ref, p_got = defect_probability(ref), defect_probability(got)
    return {
        "n": len(ref),
        "threshold": float(threshold),
        "max_abs_diff_prob": float(np.abs(p_ref - p_got).max()),
        "max_abs_diff_logit": float(np.abs(ref - got).max()),
        "agreement": float(np.mean((p_ref >= threshold) == (p_got >= threshold))),
    }


def _batches(calibration: Iterable[np.ndarray] | np.ndarray, size: int = 16) -> Iterator[np.ndarray]:
    if isinstance(calibration, np.ndarray):
        array = calibration
        calibration = (array[i:i + size] for i in range(0, len(array), size))
    for batch in calibration:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise UserError(f"calibration batches must be NCHW images, got shape {batch.shape}")
        yield batch


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol (``get_next`` until None) over our batches."""

    def __init__(self, name: str, batches: Iterator[np.ndarray]) -> None:
        self.name, self.batches, self.seen = name, batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.seen += len(batch)
        return {self.name: batch}


def quantize_int8(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  calibration: Iterable[np.ndarray] | np.ndarray) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges
    calibrated on ``calibration``: normalised NCHW training images, one array or batches).

    The model is first pre-processed as ONNX Runtime recommends (shape inference and graph
    optimisation, ``quant_pre_process``). The fp32 model's metadata is kept, with
    ``precision: int8`` and the number of calibration images added. Static int8 is not always
    faster than fp32 on a CPU; measure both.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = _load(onnx_path)
    metadata = read_metadata(onnx_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batches = _batches(calibration)
    first = next(batches, None)
    if first is None:
        raise UserError("int8 calibration got no images; give export.calibration_images >= 1 training images")
    reader = _Reader(source.graph.input[0].name, itertools.chain([first], batches))
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre))
        quantize_static(str(pre), str(raw), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(str(raw))
    meta = {**metadata, "precision": "int8", "quantization": "static QDQ, per-channel int8 weights, uint8 activations",
            "calibration_images": reader.seen}
    return _finish(model, out_path, meta)
