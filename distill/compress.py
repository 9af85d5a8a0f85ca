"""Prune the distilled student to a cost target and distil it again; export models to ONNX.

The prune stage works in rounds (``prune.steps``): each round removes channels (torch-pruning,
cost target solved on the current weights) and is followed by distillation from the teacher,
``prune.finetune_epochs`` after the early rounds and ``prune.epochs`` after the last. Every round
lives in ``student_pruned/round<k>/`` with the structure so far (``structure.json``), the weights
right after pruning (``start.safetensors``) and its own resumable training state, so a kill in
any round resumes there. A ``{latency_ms: X}`` target is first searched by measurement
(``student/latency_target.py``; saved in ``latency_curve.json`` before any training, reused on resume)
on ``constraints.runtime`` at ``constraints.batch`` with ``profile.threads``, passed in explicitly.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data.files import atomic_write, atomic_write_rows, atomic_write_text
from data.schema import to_dict
from distill.stages import (PREDICTIONS, Context, predictions_csv, skip_if_finished, student_run_parts, finish,
                            load_model)
from profiling.quality import binary_metrics
from profiling.thresholds import choose_threshold
from student.export import export_onnx, onnx_logits, onnx_session, quantize_int8, update_metadata, verify_onnx
from student.latency_target import LatencySettings, SubprocessTimer, final_check, stage_latency_search
from student.prune import StudentPruner
from training.distributed import barrier
from training.engine import EvalOutput
from training.loop import fit
from training.modeling import Classifier, is_finished, load_meta

__all__ = ["prune_stage", "export_stage"]


def prune_stage(ctx: Context, teacher: Classifier, student: Classifier) -> Classifier:
    """Prune the distilled student in rounds, each recovered by distillation from the teacher."""
    cfg = ctx.cfg
    stage_dir = ctx.run_dir / "student_pruned"
    stage_cfg = {"prune": to_dict(cfg.prune), "distill": to_dict(cfg.distill), "data": to_dict(cfg.data),
                 "seed": cfg.run.seed, "student": load_meta(ctx.run_dir / "student")["config_hash"]}
    target_ms = cfg.prune.target.get("latency_ms")
    if target_ms is not None:  # where it is measured is part of what the stage made
        latency = LatencySettings.from_config(cfg.constraints, cfg.profile)
        stage_cfg["latency"] = dataclasses.asdict(latency)
    done = skip_if_finished(ctx, stage_dir, "prune", stage_cfg)
    if done is not None:
        return done
    model = copy.deepcopy(student).cpu().train()
    example = torch.zeros(1, 3, model.img_size, model.img_size)
    train, val, trainee_of, step, _ = student_run_parts(ctx, model, teacher, stage_dir, cfg.prune)
    search = timer = None
    if target_ms is not None:
        timer = SubprocessTimer(latency, log=ctx.log)
        search = stage_latency_search(stage_dir, model.net, example, cfg.prune, timer, config=stage_cfg,
                                      loss_fn=_taylor_loss(model, train), log=ctx.log, main=ctx.dist.is_main,
                                      sync=lambda: barrier(ctx.dist))
        ctx.log(f"[prune] {target_ms} ms on {latency.runtime}: channel ratio {search.chosen.ratio:.3f} measured "
                f"{search.chosen.ms:.3f} ms at {search.chosen.macs / 1e6:.2f} M MACs ({len(search.points)} measured)")
    pruner = StudentPruner(model.net, example, cfg.prune, loss_fn=_taylor_loss(model, train),
                           macs_goal=search.chosen.macs if search else None,
                           latency=search.to_json() if search else None)
    ctx.log(f"[prune] {model.arch}: target {cfg.prune.target} of {pruner.macs0 / 1e6:.1f} M MACs, "
            f"{pruner.params0 / 1e6:.2f} M params, in {cfg.prune.steps} round(s), {cfg.prune.importance} importance")
    barrier(ctx.dist)  # every rank sees the same saved rounds
    saved = sorted(stage_dir.glob("round*/structure.json"), key=lambda p: int(p.parent.name[5:]))
    if saved:  # resume: rebuild the last started round's shapes and its weights right after pruning
        pruner.restore(json.loads(saved[-1].read_text()))
        model.net.load_state_dict(load_file(str(saved[-1].parent / "start.safetensors")))
    result = None
    for k in range(1, cfg.prune.steps + 1):
        round_dir = stage_dir / f"round{k}"
        if k < len(pruner.rounds):
            continue  # finished before an interruption; its weights live on in the later rounds
        if k > len(pruner.rounds):
            pruner.step()  # deterministic: every rank prunes the same channels of the same weights
            if timer is not None and k == cfg.prune.steps and ctx.dist.is_main:
                pruner.latency = {**pruner.latency, "final": final_check(model.net, example, timer, target_ms)}
                ctx.log(f"[prune] the pruned student measured {pruner.latency['final']['ms']:.3f} ms "
                        f"(target {target_ms} ms)")
            if ctx.dist.is_main:
                state = {n: t.contiguous() for n, t in model.net.state_dict().items()}
                atomic_write(round_dir / "start.safetensors", lambda p: save_file(state, str(p)))
                atomic_write_text(round_dir / "structure.json", json.dumps(pruner.structure()))
        record = pruner.rounds[k - 1]
        epochs = cfg.prune.epochs if k == cfg.prune.steps else cfg.prune.finetune_epochs
        ctx.log(f"[prune] round {k}/{cfg.prune.steps}: channel ratio {record['ratio']:.3f}, MACs "
                f"{record['macs_before'] / 1e6:.1f} M -> {record['macs_after'] / 1e6:.1f} M, params "
                f"{record['params_before'] / 1e6:.2f} M -> {record['params_after'] / 1e6:.2f} M; "
                f"{epochs} epoch(s) of distillation")
        round_cfg = dataclasses.replace(cfg.prune, epochs=epochs)
        result = fit(trainee_of(model), step, train, val, round_cfg, round_dir, device=ctx.device, eval_model=model,
                     channels_last=True, name=f"prune round {k}", config={**stage_cfg, "round": k}, dist=ctx.dist,
                     log=ctx.log)
        model.cpu()
    if ctx.dist.is_main:
        atomic_write_rows(stage_dir / "metrics.csv", _round_rows(stage_dir, pruner.rounds))
    structure = pruner.structure()
    finish(ctx, model, stage_dir, stage_cfg, result,
           {"pruning": structure, "cost": {"macs_unpruned": structure["macs"][0], "macs": structure["macs"][1],
                                           "params_unpruned": structure["params"][0],
                                           "params": structure["params"][1], "rounds": structure["rounds"]}})
    return model.eval()


def _round_rows(stage_dir: Path, rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch of every round, with that round's ratio and cost before and after."""
    rows = []
    for k, record in enumerate(rounds, start=1):
        cost = {key: record[key] for key in ("ratio", "macs_before", "macs_after", "params_before", "params_after")}
        path = stage_dir / f"round{k}" / "metrics.csv"
        epochs = []
        if path.is_file():
            with path.open(encoding="utf-8") as fh:
                epochs = list(csv.DictReader(fh))
        rows += [{"round": k, **cost, **row} for row in epochs or [{}]]
    return rows


def _taylor_loss(model: Classifier, train_loader):
    """Cross-entropy on one training batch, for Taylor importance's gradients."""
    def loss_fn(net: torch.nn.Module) -> torch.Tensor:
        images, labels, _, _ = next(iter(train_loader))
        device = next(net.parameters()).device
        return F.cross_entropy(net(model.view(images.to(device))), labels.to(device))
    return loss_fn


def _normalised(ctx: Context, model: Classifier, split: str, limit: int | None = None) -> torch.Tensor:
    """Plain (un-augmented) images of a split, as ``model`` sees them: resized and normalised."""
    out, n = [], 0
    for images, _, _, _ in ctx.data.loader(split, model.img_size, 64):
        out.append(model.view(images))
        n += len(images)
        if limit is not None and n >= limit:
            break
    x = torch.cat(out)
    return x[:limit] if limit is not None else x


def _onnx_outputs(ctx: Context, path: Path, model: Classifier, split: str):
    """An ONNX model's logits on a split, in the same form as :func:`training.engine.evaluate`."""
    session = onnx_session(path)
    logits, labels, index = [], [], []
    for images, y, idx, _ in ctx.data.loader(split, model.img_size, 64):
        logits.append(torch.from_numpy(onnx_logits(session, model.view(images).numpy())))
        labels.append(y)
        index.append(idx)
    return EvalOutput(torch.cat(logits), torch.cat(labels), torch.cat(index))


def export_stage(ctx: Context) -> dict[str, Any]:
    """ONNX files of the finished models, each checked against PyTorch on test images; optional int8."""
    cfg = ctx.cfg
    export_dir = ctx.run_dir / "export"
    verify_path = export_dir / "verify.json"
    stage_cfg = {"export": to_dict(cfg.export), "eval": to_dict(cfg.eval),
                 "models": {n: load_meta(ctx.run_dir / n)["config_hash"] for n in cfg.export.models
                            if is_finished(ctx.run_dir / n)}}
    if verify_path.is_file():
        done = json.loads(verify_path.read_text())
        if done.get("config") == json.loads(json.dumps(stage_cfg)):
            ctx.log("[export] finished earlier; skipped — use --force export to redo it")
            return done
    results: dict[str, Any] = {"models": {}, "config": stage_cfg}
    exported: dict[str, tuple[Path, Classifier, dict]] = {}
    for name in cfg.export.models:
        if not is_finished(ctx.run_dir / name):
            ctx.log(f"[export] {name}: no finished model in the run, not exported")
            continue
        model, meta = load_model(ctx.run_dir / name), load_meta(ctx.run_dir / name)
        keep = ("arch", "img_size", "mean", "std", "class_names", "threshold", "threshold_rule")
        path = export_onnx(model.net, export_dir / f"{name}.onnx", model.img_size, opset=cfg.export.opset,
                           dynamo=cfg.export.dynamo,
                           metadata={"model": name, **{k: meta[k] for k in keep}, "crop_pct": cfg.data.crop_pct})
        check = verify_onnx(path, model.net, _normalised(ctx, model, "test", limit=256), meta["threshold"])
        results["models"][name] = {"onnx": path.name, **check}
        exported[name] = (path, model, meta)
        ctx.log(f"[export] {path}: max |p_onnx - p_torch| {check['max_abs_diff_prob']:.2e}, "
                f"decisions agree on {100 * check['agreement']:.1f}% of {check['n']} test images")
    deployed = next((n for n in ("student_pruned", "student") if n in exported), None)
    if cfg.export.int8 and deployed is not None:
        path, model, meta = exported[deployed]
        calib = _normalised(ctx, model, "train", limit=cfg.export.calibration_images).numpy()
        int8_path = quantize_int8(path, export_dir / f"{deployed}_int8.onnx", calib)
        outputs = {sp: _onnx_outputs(ctx, int8_path, model, sp) for sp in ("train", "val", "test")}
        choice = choose_threshold(outputs["val"].probs, outputs["val"].labels, cfg.eval.threshold)
        update_metadata(int8_path, {"model": f"{deployed}_int8", "threshold": choice.threshold})
        atomic_write_text(export_dir / f"{deployed}_int8_{PREDICTIONS}", predictions_csv(outputs, ctx.data))
        test = binary_metrics(outputs["test"].probs, outputs["test"].labels, choice.threshold)
        check = verify_onnx(int8_path, model.net, _normalised(ctx, model, "test", limit=256), meta["threshold"])
        results["int8"] = {"model": f"{deployed}_int8", "onnx": int8_path.name, "from": deployed,
                           "threshold": choice.threshold, "test": test, "vs_fp32_torch": check}
        ctx.log(f"[export] {int8_path}: test AUROC {test['auroc']:.4f} (fp32 "
                f"{meta['metrics']['test']['auroc']:.4f}), decisions agree with fp32 on "
                f"{100 * check['agreement']:.1f}% of test images")
    atomic_write_text(verify_path, json.dumps(results, indent=2, default=float))
    return results


def report_stage(ctx: Context) -> dict[str, Any]:
    """Profile every finished model (cost and latency per runtime) and write the report.

    Measuring is skipped when ``profile.json`` exists (a rerun only re-renders); ``--force report``
    measures again.
    """
    from profiling.report import ModelEntry, build_report, measure

    names = [n for n in ("teacher", "student_baseline", "student", "student_pruned") if is_finished(ctx.run_dir / n)]
    if not (ctx.run_dir / "profile.json").is_file():
        export_dir = ctx.run_dir / "export"

        def entry(name: str) -> ModelEntry:
            model = load_model(ctx.run_dir / name)
            fp32, int8 = export_dir / f"{name}.onnx", export_dir / f"{name}_int8.onnx"
            return ModelEntry(model.net, model.img_size, fp32 if fp32.is_file() else None,
                              int8 if int8.is_file() else None, ctx.run_dir / name / "model.safetensors")

        measure(ctx.run_dir, {n: entry(n) for n in names}, ctx.cfg.profile, ctx.cfg.constraints, ctx.log)
    report = build_report(ctx.run_dir)
    ctx.log(f"[report] {report['verdict']}")
    ctx.log(f"[report] {ctx.run_dir / 'report.md'}")
    return report
