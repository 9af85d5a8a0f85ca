"""Say *defect* or *normal* for new photos with a trained model, and optionally show why (Grad-CAM).

    python -m deploy.predict MODEL IMAGES... [--threshold T] [--out predictions.csv|.json]
                              [--gradcam DIR] [--batch-size N] [--runtime onnxruntime|openvino] [--debug]

MODEL is a run directory (the model it deploys, :func:`deployed_model`), a model directory
(``meta.json`` + ``model.safetensors``), an exported ``.onnx`` file or its OpenVINO IR (``.xml``).
An ONNX model runs on ONNX Runtime, or on OpenVINO with ``--runtime openvino`` (an ``.xml`` file
always does; a run whose report deploys it on OpenVINO does too unless ``--runtime onnxruntime``), and
that path imports neither torch nor timm: a PC beside the line needs onnxruntime (or openvino),
numpy and Pillow, not the training stack. IMAGES are files, folders (searched recursively for
image extensions) or glob patterns.

Each image is decoded and resized exactly as in training (:func:`data.images.open_rgb`, then
:func:`data.images.square` at the model's size and crop), so a photo of another size gives the
answer the model was validated for. A file that cannot be decoded becomes a row with its error
and the rest are still predicted; only a missing model or no images at all stop the command
(exit status 2, one message, a traceback only with ``--debug``).

A model trained on tiles (``data.tiles``; its metadata says how) cuts each image the same way,
scores all its tiles as one batch and calls the image by its worst tile, at the image-level
threshold (:mod:`deploy.tiled`); ``--gradcam`` then draws every tile's score over the image and the
Grad-CAM map inside the worst tile.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from core.errors import UserError, run_cli
from core.files import atomic_write_text
from core.rundir import DEPLOY_ORDER, META, WEIGHTS, RunDir, is_model_dir, read_json
from data import DEFECT, NORMAL
from data.images import BadImage, open_rgb, square
from data.yolo import IMAGE_EXTENSIONS
from deploy.runtime import defect_probability, onnx_metadata, onnx_session
from deploy.tiled import Tiling, score_image, tiling_of

__all__ = ["Recipe", "Prediction", "deployed_model", "deployed_runtime", "resolve_model", "collect_images",
           "load_backend", "normalise", "predict", "main"]



@dataclass(frozen=True)
class Recipe:
    """What a model needs to see an image as in training, and how to read its answer."""

    source: str  # the file or directory the model was loaded from
    runtime: str  # "onnxruntime", "openvino" or "pytorch"
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float
    class_names: tuple[str, str]
    crop_pct: float = 1.0  # data.crop_pct of the run; 1.0 (its default) when the model does not say
    tiles: Tiling | None = None  # a model trained on tiles: how it cuts an image (deploy/tiled.py)

    @property
    def decision_threshold(self) -> float:
        """The threshold an image's probability is compared with: the image-level one of a tiled model."""
        if self.tiles is not None and self.tiles.threshold is not None:
            return self.tiles.threshold
        return self.threshold


@dataclass
class Prediction:
    """One row of the output: a probability and decision, or the reason there is none."""

    path: str
    prob_defect: float | None = None
    decision: str | None = None
    error: str | None = None
    gradcam: str | None = None
    tiles: int | None = None  # a tiled model: how many tiles the image was cut into
    worst_tile: str | None = None  # and the one that decided: x0,y0,x1,y1 in the image's pixels


class Backend(Protocol):
    recipe: Recipe

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, 2) for normalised N,C,H,W float32 images at ``recipe.img_size``."""
        ...


# ----------------------------------------------------------------------------- which model
def _named_in_run(run_dir: Path, name: str) -> Path | None:
    """A model of the run given by name (its exported ONNX file, else its directory) or as a path in it."""
    run = RunDir(run_dir)
    for candidate in (run.onnx(name), run.model(name)):
        if (candidate.is_file() and candidate.suffix == ".onnx") or is_model_dir(candidate):
            return candidate
    return None


def deployed_model(run_dir: Path) -> Path:
    """The model a run deploys: the one ``report.json`` names under ``"deployed"`` (a path in the run
    or a model name, or an object with ``"path"`` or ``"model"``), else the pruned student, else the
    student, each as its fp32 ONNX file when it was exported, else as its PyTorch directory."""
    report = RunDir(run_dir).report_json
    if report.is_file():
        try:
            entry = json.loads(report.read_text(encoding="utf-8")).get("deployed")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"'{report}' is not a JSON object; rerun the report stage with --force report") from None
        if isinstance(entry, dict):
            entry = entry.get("path") or entry.get("model")
        if entry:
            found = _named_in_run(run_dir, str(entry))
            if found is None:
                raise UserError(f"'{report}' deploys '{entry}', which is not in the run; give the model "
                                "directory or .onnx file to use instead")
            return found
    for name in DEPLOY_ORDER:
        found = _named_in_run(run_dir, name)
        if found is not None:
            return found
    raise UserError(f"'{run_dir}' is neither a model directory ({META} + {WEIGHTS}) nor a run with a finished "
                    f"student (looked for export/<model>.onnx and <model>/ for {', '.join(DEPLOY_ORDER)}); "
                    "train one with python -m distill.run, or give a model directory or an .onnx file")


def resolve_model(path: str | Path) -> Path:
    """The .onnx file or model directory that ``path`` names, directly or as a run directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model '{path}' does not exist; give a run directory (runs/<name>), a model directory "
                        f"({META} + {WEIGHTS}) or an exported .onnx file")
    if path.is_file():
        if path.suffix.lower() not in (".onnx", ".xml"):
            raise UserError(f"'{path}' is not a model; give a run directory, a model directory, an .onnx file "
                            "or an OpenVINO IR .xml file")
        return path
    return path if is_model_dir(path) else deployed_model(path)


def _recipe(meta: dict[str, Any], source: Path, runtime: str, crop_pct: float | None) -> Recipe:
    missing = [k for k in ("img_size", "mean", "std", "threshold", "class_names") if k not in meta]
    if missing:
        raise UserError(f"'{source}' lacks {', '.join(missing)} in its metadata, so it was not made by this "
                        "project's pipeline; give a model directory or .onnx file that python -m distill.run wrote")
    return Recipe(str(source), runtime, int(meta["img_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                  float(meta["threshold"]), tuple(meta["class_names"]), float(crop_pct or 1.0),
                  tiling_of(meta, source))


# ----------------------------------------------------------------------------- runtimes
def _read_meta(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / META)


def _pytorch_source(onnx_path: Path, meta: dict[str, Any]) -> Path | None:
    """The model directory an ONNX file of a run was exported from (``runs/x/export/student.onnx``
    -> ``runs/x/student``; an int8 file -> the fp32 model it was quantised from), if present."""
    name = str(meta.get("model") or onnx_path.stem).removesuffix("_int8")
    candidate = onnx_path.parent.parent / name
    return candidate if onnx_path.parent.name == "export" and is_model_dir(candidate) else None


class OnnxBackend:
    """An exported model on ONNX Runtime (CPU); its recipe is the metadata stored in the file."""

    def __init__(self, path: Path) -> None:
        self.session = onnx_session(path)
        meta = onnx_metadata(self.session, path)
        self.torch_dir = _pytorch_source(path, meta)
        crop = meta.get("crop_pct")  # an ONNX file without it: the model's own meta.json
        if crop is None and self.torch_dir is not None:
            crop = _read_meta(self.torch_dir).get("crop_pct")
        self.recipe = _recipe(meta, path, "onnxruntime", crop)
        self.input = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]


class OpenVinoBackend:
    """An exported model (.onnx, or its IR .xml) compiled by OpenVINO for the CPU, fp32
    (:func:`deploy.openvino_runtime.compile_openvino`); its recipe is the metadata the export stored."""

    def __init__(self, path: Path) -> None:
        from deploy.openvino_runtime import compile_openvino, ir_metadata

        self.compiled = compile_openvino(path)
        meta = ir_metadata(path)
        self.torch_dir = _pytorch_source(path, meta)
        crop = meta.get("crop_pct")
        if crop is None and self.torch_dir is not None:
            crop = _read_meta(self.torch_dir).get("crop_pct")
        self.recipe = _recipe(meta, path, "openvino", crop)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        from deploy.openvino_runtime import openvino_logits

        return openvino_logits(self.compiled, batch)


def _exported_backend(path: Path, runtime: str | None) -> OnnxBackend | OpenVinoBackend:
    """The backend for an exported file: OpenVINO for an IR .xml or when asked, else ONNX Runtime."""
    if path.suffix.lower() == ".xml":
        if runtime == "onnxruntime":
            raise UserError(f"'{path}' is OpenVINO IR, which ONNX Runtime cannot run; give the .onnx file beside it "
                            "or use --runtime openvino")
        return OpenVinoBackend(path)
    return OpenVinoBackend(path) if runtime == "openvino" else OnnxBackend(path)


def deployed_runtime(model_arg: str | Path) -> str | None:
    """``openvino`` when MODEL is a run directory whose report.json deploys its model on OpenVINO, else None."""
    report = RunDir(Path(model_arg)).report_json
    if not Path(model_arg).is_dir() or not report.is_file():
        return None
    try:
        entry = json.loads(report.read_text(encoding="utf-8")).get("deployed")
    except (json.JSONDecodeError, AttributeError):
        return None  # deployed_model has already said what is wrong with the file
    return "openvino" if isinstance(entry, dict) and entry.get("runtime") == "openvino" else None


class TorchBackend:
    """A model directory rebuilt in PyTorch (no pickle); it can also explain itself with Grad-CAM."""

    def __init__(self, model_dir: Path) -> None:
        from training.modeling import load_model

        self.model = load_model(model_dir)
        meta = _read_meta(model_dir)
        self.recipe = _recipe(meta, model_dir, "pytorch", meta.get("crop_pct"))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.net(torch.from_numpy(batch)).float().numpy()

    def cams(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from deploy.explain import gradcam

        return gradcam(self.model.net, torch.from_numpy(batch))


def load_backend(path: Path, gradcam: bool = False,
                 runtime: str | None = None) -> tuple[Backend, TorchBackend | None]:
    """The model that predicts, and the PyTorch model that explains (when ``gradcam`` is asked).

    ``runtime`` (``onnxruntime`` or ``openvino``) runs an exported file there; None: ONNX Runtime for
    an .onnx file, OpenVINO for an .xml file."""
    if path.suffix.lower() not in (".onnx", ".xml"):
        if runtime is not None:
            raise UserError(f"--runtime {runtime} runs an exported model, and '{path}' is a PyTorch model directory; "
                            "give the run directory or its export/<model>.onnx file")
        backend = TorchBackend(path)
        return backend, (backend if gradcam else None)
    backend = _exported_backend(path, runtime)
    if not gradcam:
        return backend, None
    if backend.torch_dir is None:
        raise UserError(f"--gradcam needs the PyTorch model, and '{path}' is an exported file with no model directory "
                        "beside it (runs/<name>/export/<model>.onnx -> runs/<name>/<model>/); give the run "
                        "directory or the model directory instead")
    return backend, TorchBackend(backend.torch_dir)


# ----------------------------------------------------------------------------- which images
@dataclass
class ImageList:
    paths: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # arguments that named nothing
    skipped: int = 0  # files in searched folders without an image extension


def _add_folder(found: ImageList, folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                found.paths.append(p)
            else:
                found.skipped += 1


def _unique(paths: list[Path]) -> list[Path]:
    """Each file once (a folder and a glob may both name it), first mention first."""
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def collect_images(args: list[str]) -> ImageList:
    """Files as given (whatever their extension: the user named them), folders recursively and glob
    matches by image extension; each file once, in the order given."""
    found = ImageList()
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            _add_folder(found, path)
        elif path.is_file():
            found.paths.append(path)
        elif any(c in arg for c in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            for m in map(Path, matches):
                if m.is_dir():
                    _add_folder(found, m)
                elif m.suffix.lower() in IMAGE_EXTENSIONS:
                    found.paths.append(m)
            if not matches:
                found.missing.append(arg)
        else:
            found.missing.append(arg)
    found.paths = _unique(found.paths)
    if not found.paths:
        named = ", ".join(f"'{a}'" for a in args)
        raise UserError(f"no images found in {named} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
                        "in folders, recursively)")
    return found


# ----------------------------------------------------------------------------- predicting
def _decode(path: Path, recipe: Recipe) -> np.ndarray | str:
    """The image as the model saw such images in training (uint8 H,W,3), or why it cannot be."""
    try:
        return square(open_rgb(path), recipe.img_size, recipe.crop_pct)
    except BadImage as exc:
        return str(exc)


def normalise(pixels: list[np.ndarray], recipe: Recipe) -> np.ndarray:
    """uint8 H,W,3 images -> normalised float32 N,C,H,W, as ``data.transforms.ModelView`` does."""
    x = np.stack(pixels).astype(np.float32) / 255.0
    x = (x - np.asarray(recipe.mean, np.float32)) / np.asarray(recipe.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _cam_name(path: Path, base: Path) -> str:
    """A unique overlay name: the image's path below the common folder, '/' -> '__', plus .png."""
    return "__".join(path.resolve().relative_to(base).parts) + ".png"


def _batch(backend: Backend, paths: list[Path], pixels: list[np.ndarray | str], threshold: float,
           explainer: TorchBackend | None, cam_dir: Path | None, base: Path) -> list[Prediction]:
    rows = [Prediction(str(p), error=px) if isinstance(px, str) else Prediction(str(p))
            for p, px in zip(paths, pixels)]
    good = [i for i, px in enumerate(pixels) if not isinstance(px, str)]
    if not good:
        return rows
    batch = normalise([pixels[i] for i in good], backend.recipe)
    names = backend.recipe.class_names
    for i, prob in zip(good, defect_probability(backend.logits(batch)).tolist()):
        rows[i].prob_defect = prob
        rows[i].decision = names[DEFECT] if prob >= threshold else names[NORMAL]
    if explainer is not None and cam_dir is not None:
        from PIL import Image

        from deploy.explain import overlay

        # The explainer is the model itself, or the PyTorch model an ONNX file was exported from:
        # the same input recipe, so the same normalised batch.
        for i, cam in zip(good, explainer.cams(batch)):
            out = cam_dir / _cam_name(paths[i], base)
            Image.fromarray(overlay(pixels[i], cam)).save(out)
            rows[i].gradcam = str(out)
    return rows


def predict(backend: Backend, paths: list[Path], *, threshold: float | None = None, batch_size: int = 32,
            explainer: TorchBackend | None = None, cam_dir: Path | None = None,
            on_row: Callable[[Prediction], None] | None = None) -> list[Prediction]:
    """One :class:`Prediction` per path, in order; ``on_row`` sees each as soon as it is made."""
    threshold = backend.recipe.decision_threshold if threshold is None else threshold
    base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    if backend.recipe.tiles is not None:
        return _predict_tiled(backend, paths, threshold, explainer, cam_dir, base, on_row)
    rows: list[Prediction] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            pixels = list(pool.map(lambda p: _decode(p, backend.recipe), chunk))
            for row in _batch(backend, chunk, pixels, threshold, explainer, cam_dir, base):
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _predict_tiled(backend: Backend, paths: list[Path], threshold: float, explainer: TorchBackend | None,
                   cam_dir: Path | None, base: Path, on_row: Callable[[Prediction], None] | None) -> list[Prediction]:
    """A tiled model: each image cut as in training, its tiles scored as one batch, called by its
    worst tile; with Grad-CAM, the tile scores over the image and the map inside the worst tile."""
    recipe, tiling = backend.recipe, backend.recipe.tiles
    names = recipe.class_names

    def probabilities(tiles: list[np.ndarray]) -> np.ndarray:
        return defect_probability(backend.logits(normalise(tiles, recipe)))

    rows: list[Prediction] = []
    for path in paths:
        scored = score_image(path, tiling, recipe.img_size, probabilities)  # type: ignore[arg-type]
        if isinstance(scored, str):
            row = Prediction(str(path), error=scored)
        else:
            row = Prediction(str(path), scored.prob, names[DEFECT] if scored.prob >= threshold else names[NORMAL],
                             tiles=len(scored.rects), worst_tile=",".join(map(str, scored.rects[scored.worst])))
            if explainer is not None and cam_dir is not None:
                from PIL import Image

                from deploy.explain import tile_overlay

                cam = explainer.cams(normalise([scored.tiles[scored.worst]], recipe))[0]
                out = cam_dir / _cam_name(path, base)
                Image.fromarray(tile_overlay(scored.pixels, scored.rects, scored.probs, scored.worst, cam)).save(out)
                row.gradcam = str(out)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ----------------------------------------------------------------------------- output
def _line(row: Prediction) -> str:
    if row.error is not None:
        return f"{'error':<8} {'-':>6}  {row.path}: {row.error}"
    return f"{row.decision:<8} {row.prob_defect:6.4f}  {row.path}"


def _counts(rows: list[Prediction], recipe: Recipe) -> dict[str, int]:
    counts = {name: sum(r.decision == name for r in rows) for name in recipe.class_names}
    return {**counts, "error": sum(r.error is not None for r in rows)}


def _write(path: Path, rows: list[Prediction], recipe: Recipe, threshold: float) -> None:
    if path.suffix.lower() == ".json":
        doc = {"model": recipe.source, "runtime": recipe.runtime, "threshold": threshold,
               "counts": _counts(rows, recipe), "predictions": [asdict(r) for r in rows]}
        atomic_write_text(path, json.dumps(doc, indent=2))
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    tiled = recipe.tiles is not None
    w.writerow(["path", "prob_defect", "decision", "threshold", "error", "gradcam"]
               + (["tiles", "worst_tile"] if tiled else []))
    for r in rows:
        prob = "" if r.prob_defect is None else f"{r.prob_defect:.6g}"
        w.writerow([r.path, prob, r.decision or "", threshold, r.error or "", r.gradcam or ""]
                   + ([r.tiles or "", r.worst_tile or ""] if tiled else []))
    atomic_write_text(path, buf.getvalue())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a run directory, a model directory (meta.json + model.safetensors) or an .onnx file")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--threshold", type=float, help="defect when its probability is >= this (default: the model's)")
    p.add_argument("--out", type=Path, help="write the predictions to this .csv (or .json) file")
    p.add_argument("--gradcam", type=Path, metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                   help="run an exported model on this runtime (default: OpenVINO for an .xml file or a run "
                        "deployed on OpenVINO, else ONNX Runtime); openvino needs pip install -e \".[openvino]\"")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _summary(rows: list[Prediction], images: ImageList, recipe: Recipe) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in _counts(rows, recipe).items())
    skipped = (f"; {images.skipped} other file(s) in the folders skipped (not {'/'.join(sorted(IMAGE_EXTENSIONS))})"
               if images.skipped else "")
    return f"{len(rows)} images: {counts}{skipped}"


def _run(args: argparse.Namespace) -> list[Prediction]:
    """Check the arguments (cheap things first), predict, print, write."""
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_path = resolve_model(args.model)
    images = collect_images(args.images)
    runtime = args.runtime or deployed_runtime(args.model)
    if args.runtime is None and runtime == "openvino" and model_path.suffix.lower() == ".onnx":
        from deploy.openvino_runtime import INSTALL_HINT, openvino_version

        if openvino_version() is None:  # the same file runs on ONNX Runtime, checked against PyTorch like OpenVINO
            print(f"note: the run deploys its model on OpenVINO, which is not installed here; running the same "
                  f"file on ONNX Runtime ({INSTALL_HINT} to use OpenVINO)")
            runtime = None
    backend, explainer = load_backend(model_path, gradcam=args.gradcam is not None, runtime=runtime)
    recipe = backend.recipe
    threshold = recipe.decision_threshold if args.threshold is None else args.threshold
    tiles = (f", tiles: {recipe.tiles.describe()}, an image is its worst tile" if recipe.tiles is not None else "")
    print(f"model {recipe.source} ({recipe.runtime}, {recipe.img_size} px{tiles}, threshold {threshold:.4g})")
    if explainer is not None and explainer is not backend:
        print(f"Grad-CAM from the PyTorch model it was exported from: {explainer.recipe.source}")
    # A bar on a terminal only (disable=None), and only when there is enough to wait for.
    with tqdm(total=len(images.paths), unit="img", disable=True if len(images.paths) < 100 else None) as bar:
        def show(row: Prediction) -> None:
            tqdm.write(_line(row), file=sys.stdout)
            bar.update()

        rows = predict(backend, images.paths, threshold=threshold, batch_size=args.batch_size,
                       explainer=explainer, cam_dir=args.gradcam, on_row=show)
    for arg in images.missing:
        rows.append(Prediction(arg, error="no such file, folder or glob match"))
        print(_line(rows[-1]))
    print(_summary(rows, images, recipe))
    if args.out is not None:
        _write(args.out, rows, recipe, threshold)
        print(f"wrote {args.out}")
    if args.gradcam is not None:
        print(f"wrote Grad-CAM overlays to {args.gradcam}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    def body() -> None:
        _run(args)

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
