"""The export and report stages: ONNX files of the finished models, checked against PyTorch, and the
report that profiles them beside their accuracy.

Both are derived from the models, so a change is redone rather than refused: the export stage's
record holds the export settings and the digest of every model it exports (weights and meta.json,
whose threshold travels in the file), so a retrained model or new settings re-export; the profile
in ``profile.json`` records the digest of every file it measured, so a new export re-profiles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from core import provenance
from core.files import atomic_write_text
from core.rundir import DEPLOY_ORDER, RECORD
from core.schema import to_dict
from deploy.export import (export_onnx, quantize_int8, read_metadata, read_tiles, update_metadata, verify_onnx,
                           verify_openvino)
from deploy.runtime import onnx_logits, onnx_session
from distill.stages import Context, levels, write_levels
from profiling.report.quality import binary_metrics
from profiling.report.thresholds import choose_threshold
from training.engine import EvalOutput
from training.modeling import Classifier, load_model

__all__ = ["export_stage", "report_stage", "uses_openvino"]

_ONNX_META = ("arch", "img_size", "mean", "std", "class_names", "threshold", "threshold_rule")


def _normalised(ctx: Context, model: Classifier, split: str, limit: int | None = None) -> torch.Tensor:
    """Plain (un-augmented) images (or tiles) of a split, as ``model`` sees them: resized and normalised."""
    out, n = [], 0
    for images, _, _, _ in ctx.data.unit_loader(split, model.img_size, 64):
        out.append(model.view(images))
        n += len(images)
        if limit is not None and n >= limit:
            break
    x = torch.cat(out)
    return x[:limit] if limit is not None else x


def _onnx_outputs(ctx: Context, path: Path, model: Classifier, split: str) -> EvalOutput:
    """An ONNX model's logits on a split (every tile with data.tiles), in the form of
    :func:`training.engine.evaluate`."""
    session = onnx_session(path)
    logits, labels, index = [], [], []
    for images, y, idx, _ in ctx.data.unit_loader(split, model.img_size, 64, every_tile=True):
        logits.append(torch.from_numpy(onnx_logits(session, model.view(images).numpy())))
        labels.append(y)
        index.append(idx)
    return EvalOutput(torch.cat(logits), torch.cat(labels), torch.cat(index))


def export_record(ctx: Context) -> dict[str, Any]:
    """The export stage's provenance: its settings and every model it would export."""
    run, cfg = ctx.run, ctx.cfg
    names = [n for n in cfg.export.models if run.finished(n)]
    inputs: dict[str, Path] = {}
    for name in names:
        inputs[name] = run.weights(name)
        inputs[f"{name}.meta"] = run.meta(name)
    config = {"export": to_dict(cfg.export), "threshold": cfg.eval.threshold, "crop_pct": cfg.data.crop_pct,
              "models": names, "openvino_check": uses_openvino(cfg)}
    return provenance.make("export", config, inputs)


def uses_openvino(cfg: Any) -> bool:
    """Whether the exported models are also run on OpenVINO (checked against PyTorch): asked for by
    ``export.openvino``, or needed because OpenVINO is timed (a profile runtime, the constraint's)."""
    return bool(cfg.export.openvino or "openvino" in cfg.profile.runtimes or cfg.constraints.runtime == "openvino")


def _openvino(ctx: Context, name: str, path: Path, model: Classifier, meta: dict[str, Any]) -> dict[str, Any]:
    """``name``'s ONNX file on OpenVINO, checked against PyTorch like ONNX Runtime; its IR saved when asked."""
    from deploy.openvino_runtime import save_ir

    check = verify_openvino(path, model.net, _normalised(ctx, model, "test", limit=256), meta["threshold"])
    ctx.log(f"[export] {path.name} on OpenVINO {check['openvino']}: max |p_openvino - p_torch| "
            f"{check['max_abs_diff_prob']:.2e}, decisions agree on {100 * check['agreement']:.1f}% of "
            f"{check['n']} test images")
    if ctx.cfg.export.openvino:
        xml = save_ir(path, read_metadata(path))
        check["ir"] = xml.name
        ctx.log(f"[export] {xml} (+ {xml.with_suffix('.bin').name}): OpenVINO IR, fp32 weights")
    return check


def _int8(ctx: Context, name: str, path: Path, model: Classifier, meta: dict[str, Any]) -> dict[str, Any]:
    """Static int8 copy of ``name``'s ONNX file, with its own threshold chosen on validation."""
    cfg, run = ctx.cfg, ctx.run
    calib = _normalised(ctx, model, "train", limit=cfg.export.calibration_images).numpy()
    int8_path = quantize_int8(path, run.onnx(name, int8=True), calib)
    outputs, images = levels(ctx.data, {sp: _onnx_outputs(ctx, int8_path, model, sp)
                                        for sp in ("train", "val", "test")})
    choice = choose_threshold(outputs["val"].probs, outputs["val"].labels, cfg.eval.threshold)
    changes: dict[str, Any] = {"model": f"{name}_int8", "threshold": choice.threshold}
    image: dict[str, Any] | None = None
    if images is not None:  # the int8 copy's own image-level threshold, chosen on validation images
        ichoice = choose_threshold(images["val"].probs, images["val"].labels, cfg.eval.threshold)
        image = {"threshold": ichoice.threshold,
                 "test": binary_metrics(images["test"].probs, images["test"].labels, ichoice.threshold)}
        changes["tiles"] = {**read_tiles(int8_path), "threshold": ichoice.threshold}
    update_metadata(int8_path, changes)
    write_levels(run.export, outputs, images, ctx.data, predictions=run.int8_predictions(name),
                 image_predictions=run.int8_image_predictions(name))
    test = binary_metrics(outputs["test"].probs, outputs["test"].labels, choice.threshold)
    check = verify_onnx(int8_path, model.net, _normalised(ctx, model, "test", limit=256), meta["threshold"])
    ctx.log(f"[export] {int8_path}: test AUROC {test['auroc']:.4f} (fp32 {meta['metrics']['test']['auroc']:.4f}), "
            f"decisions agree with fp32 on {100 * check['agreement']:.1f}% of test "
            f"{'tiles' if ctx.data.tiled else 'images'}"
            + (f"; images (worst tile): test AUROC {image['test']['auroc']:.4f}" if image is not None else ""))
    return {"model": f"{name}_int8", "onnx": int8_path.name, "from": name, "threshold": choice.threshold,
            "test": test, "vs_fp32_torch": check, **({"image": image} if image is not None else {})}


def export_stage(ctx: Context) -> dict[str, Any]:
    """ONNX files of the finished models, each checked against PyTorch on test images; optional int8."""
    cfg, run = ctx.cfg, ctx.run
    record = export_record(ctx)
    verdict = provenance.check(run.record("export"), record)
    if verdict.same and run.verify.is_file():
        ctx.log("[export] finished earlier with the same settings and models; skipped — use --force export to redo it")
        return json.loads(run.verify.read_text(encoding="utf-8"))
    if verdict.state in ("config", "inputs", "outputs"):
        ctx.log(f"[export] {', '.join(verdict.changed[:6])} changed since the last export: exporting again")
    if run.export.is_dir():  # nothing of an earlier export may outlive it (an int8 file turned off, say)
        shutil.rmtree(run.export)
    results: dict[str, Any] = {"models": {}}
    exported: dict[str, tuple[Path, Classifier, dict]] = {}
    for name in cfg.export.models:
        if not run.finished(name):
            ctx.log(f"[export] {name}: no finished model in the run, not exported")
            continue
        model, meta = load_model(run.model(name)), run.read_meta(name)
        tiles = {"tiles": {**meta["tiles"], "threshold": meta["image"]["threshold"]}} if meta.get("tiles") else {}
        path = export_onnx(model.net, run.onnx(name), model.img_size, opset=cfg.export.opset, dynamo=cfg.export.dynamo,
                           metadata={"model": name, **{k: meta[k] for k in _ONNX_META}, "crop_pct": cfg.data.crop_pct,
                                     **tiles})
        check = verify_onnx(path, model.net, _normalised(ctx, model, "test", limit=256), meta["threshold"])
        results["models"][name] = {"onnx": path.name, **check}
        if uses_openvino(cfg):
            results["models"][name]["openvino"] = _openvino(ctx, name, path, model, meta)
        exported[name] = (path, model, meta)
        ctx.log(f"[export] {path}: max |p_onnx - p_torch| {check['max_abs_diff_prob']:.2e}, "
                f"decisions agree on {100 * check['agreement']:.1f}% of {check['n']} test "
                f"{'tiles' if ctx.data.tiled else 'images'}")
    deployed = next((n for n in DEPLOY_ORDER if n in exported), None)
    if cfg.export.int8 and deployed is not None:
        results["int8"] = _int8(ctx, deployed, *exported[deployed])
    atomic_write_text(run.verify, json.dumps(results, indent=2, default=float))
    files = [p.name for p in run.export.iterdir()
             if p.suffix in (".onnx", ".json", ".xml", ".bin") and p.name != RECORD]
    provenance.save(run.record("export"), provenance.finish(record, run.export, sorted(files)))
    return results


def report_stage(ctx: Context) -> dict[str, Any]:
    """Profile every finished model (cost and latency per runtime) and write the report.

    The profile is measured again only when its settings or a file it measured changed (a new
    export, a retrained model); otherwise a rerun only re-renders. ``--force report`` measures again.
    """
    from profiling.report.build import build_report
    from profiling.report.measure import measure_run

    measure_run(ctx.run, ctx.cfg.profile, ctx.cfg.constraints, ctx.log)
    report = build_report(ctx.run_dir)
    ctx.log(f"[report] {report['verdict']}")
    ctx.log(f"[report] {ctx.run.report_md}")
    return report
