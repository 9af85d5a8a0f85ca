"""The stages the runner calls, each taking what the previous one made and returning its artifact.

A stage directory is finished when its ``meta.json`` exists; then the stage is loaded, not rerun.
Otherwise ``fit`` resumes from ``last.ckpt`` if there is one. Every finished model gets the same
treatment (:func:`finish`): predictions on every split, a decision threshold chosen on validation
only, test metrics at that threshold, and ``model.safetensors`` + ``meta.json``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data import CLASS_NAMES
from data.errors import UserError
from data.files import atomic_write_text
from data.manifest import SPLITS
from data.prepare import PreparedData
from data.schema import to_dict
from data.transforms import ModelView
from distill.config import Config, changed_keys, config_hash
from distill.steps import StudentTrainee, ce_step, distill_step, make_projector
from distill.teacher_cache import TeacherCache, build_teacher_cache
from profiling.quality import binary_metrics
from profiling.thresholds import choose_threshold
from student.model import build_student
from teacher.model import build_teacher, teacher_network, teacher_optimizer
from training.distributed import SINGLE, Dist, barrier, gather_eval
from training.config import TrainConfig
from training.engine import EvalOutput, evaluate, precision_for
from training.loop import FitResult, fit
from training.modeling import Classifier, create_network, is_finished, load_meta, load_weights, save_artifact

__all__ = ["Context", "teacher_stage", "student_stage", "baseline_stage", "load_model", "finish", "PREDICTIONS"]

PREDICTIONS = "predictions.csv"


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    data: PreparedData
    device: torch.device
    log: Callable[[str], None] = print
    dist: Dist = SINGLE

    def loader(self, split: str, size: int, batch_size: int, *, train: bool = False, views: int | None = None,
               fraction: float = 1.0):
        """This process's loader: under torchrun, its shard of every batch (``batch_size`` is global)."""
        return self.data.loader(split, size, self.dist.shard_batch(batch_size), train=train, views=views,
                                num_replicas=self.dist.world, rank=self.dist.rank, fraction=fraction)


# ----------------------------------------------------------------------------- loading
def load_model(stage_dir: Path) -> Classifier:
    """A finished stage's model, rebuilt from meta.json and safetensors (no pickle)."""
    meta = load_meta(stage_dir)
    if meta.get("conv_stem"):
        net = teacher_network(meta["arch"], conv_stem=True, img_size=meta["img_size"],
                              model_kwargs=meta.get("model_kwargs"))
    else:
        net = create_network(meta["arch"], img_size=meta["img_size"], model_kwargs=meta.get("model_kwargs"))
    if meta.get("pruning"):
        from student.prune import rebuild_pruned

        example = torch.zeros(1, 3, meta["img_size"], meta["img_size"])
        net = rebuild_pruned(net, example, meta["pruning"])
    load_weights(net, stage_dir)
    return Classifier(net, ModelView(meta["img_size"], meta["mean"], meta["std"]), meta["arch"],
                      meta.get("model_kwargs")).eval()


# ----------------------------------------------------------------------------- finishing
def predictions_csv(outputs: dict[str, EvalOutput], data: PreparedData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "index", "path", "label", "prob_defect", "logit_normal", "logit_defect"])
    for split, out in outputs.items():
        samples = data.split(split)
        for i, label, prob, logit in zip(out.index.tolist(), out.labels.tolist(), out.probs.tolist(),
                                         out.logits.tolist()):
            w.writerow([split, i, samples[i].path, label, f"{prob:.6g}", f"{logit[0]:.6g}", f"{logit[1]:.6g}"])
    return buf.getvalue()


def finish(ctx: Context, model: Classifier, stage_dir: Path, stage_cfg: Any, result: FitResult | None,
           extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every split, choose the threshold on validation, score test, save the artifact."""
    cfg = ctx.cfg
    precision = precision_for(ctx.device, True)
    model.to(ctx.device).eval()
    outputs = {sp: gather_eval(evaluate(model, ctx.loader(sp, model.img_size, 64), device=ctx.device,
                                        precision=precision, desc=f"{stage_dir.name} predict {sp}"), ctx.dist)
               for sp in SPLITS}
    choice = choose_threshold(outputs["val"].probs, outputs["val"].labels, cfg.eval.threshold)
    metrics = {sp: binary_metrics(out.probs, out.labels, choice.threshold) for sp, out in outputs.items()}
    meta = {
        "stage": stage_dir.name,
        "threshold": choice.threshold,
        "threshold_rule": cfg.eval.threshold,
        "threshold_on_val": {"recall": choice.recall, "specificity": choice.specificity, "f1": choice.f1},
        "metrics": metrics,
        "best_epoch": result.best_epoch if result else None,
        "epochs_run": len(result.history) if result else 0,
        "config_hash": config_hash(stage_cfg),
        "config": stage_cfg,
        "class_names": list(CLASS_NAMES),
        **(extra_meta or {}),
    }
    if ctx.dist.is_main:
        atomic_write_text(stage_dir / PREDICTIONS, predictions_csv(outputs, ctx.data))
        save_artifact(stage_dir, model.cpu(), meta)
    barrier(ctx.dist)
    test = metrics["test"]
    ctx.log(f"[{stage_dir.name}] test AUROC {test['auroc']:.4f}  F1 {test['f1']:.4f}  recall {test['recall']:.4f}  "
            f"at threshold {choice.threshold:.4f} ({cfg.eval.threshold} on val)")
    return meta


def skip_if_finished(ctx: Context, stage_dir: Path, stage: str, stage_cfg: dict[str, Any]) -> Classifier | None:
    """The finished model of this stage, if there is one made with the same config."""
    if not is_finished(stage_dir):
        return None
    meta = load_meta(stage_dir)
    if meta.get("config_hash") != config_hash(stage_cfg):
        saved = meta.get("config") or {}
        now = json.loads(json.dumps(stage_cfg, default=str))
        keys = ", ".join(changed_keys(saved, now)[:8]) or "unknown keys"
        raise UserError(
            f"'{stage_dir}' was made with a different config (changed: {keys}); results of two configs must not "
            f"mix. Rerun with --force {stage} to redo it (and the stages after it), or choose a new run.name"
        )
    ctx.log(f"[{stage_dir.name}] finished earlier (test AUROC {meta['metrics']['test']['auroc']:.4f}); "
            f"skipped — use --force {stage} to redo it")
    return load_model(stage_dir)


# ----------------------------------------------------------------------------- teacher
def teacher_stage(ctx: Context) -> Classifier:
    """Fine-tune (or train from scratch) the ViT teacher."""
    cfg = ctx.cfg
    stage_dir = ctx.run_dir / "teacher"
    stage_cfg = {"teacher": to_dict(cfg.teacher), "data": to_dict(cfg.data), "seed": cfg.run.seed}
    done = skip_if_finished(ctx, stage_dir, "teacher", stage_cfg)
    if done is not None:
        return done
    model = build_teacher(cfg.teacher)
    weights = ctx.data.class_weights() if cfg.data.class_weighted_loss else None
    train = ctx.loader("train", model.img_size, cfg.teacher.batch_size, train=True)
    val = ctx.loader("val", model.img_size, 64)
    stem = ", convolutional stem" if cfg.teacher.conv_stem else ""
    ctx.log(f"[teacher] {cfg.teacher.arch}{stem} at {model.img_size} px, {_count(model):,} params, "
            f"{'pretrained' if cfg.teacher.pretrained or cfg.teacher.weights else 'from scratch'}, "
            f"{cfg.teacher.epochs} epochs on {ctx.device.type}")
    result = fit(model, ce_step(cfg.teacher.label_smoothing, weights), train, val, cfg.teacher, stage_dir,
                 device=ctx.device, optimizer_factory=teacher_optimizer(cfg.teacher), name="teacher",
                 config=stage_cfg, dist=ctx.dist, log=ctx.log)
    finish(ctx, model, stage_dir, stage_cfg, result, {"conv_stem": cfg.teacher.conv_stem})
    return model.eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- student
def student_run_parts(ctx: Context, student: Classifier, teacher: Classifier | None, stage_dir: Path,
                      train_cfg: TrainConfig | None = None):
    """Loaders, trainee maker, step and a description for training ``student`` (distilled from
    ``teacher``, or from scratch when it is None). Shared by the student and prune stages;
    ``train_cfg`` (default ``cfg.student``) gives the batch size and label smoothing."""
    cfg = ctx.cfg
    train_cfg = train_cfg or cfg.student
    weights = ctx.data.class_weights() if cfg.data.class_weighted_loss else None
    # One crop for both models, at the larger of their sizes; each resizes it to its own.
    size = max(student.img_size, teacher.img_size) if teacher is not None else student.img_size
    cached = teacher is not None and cfg.distill.teacher_outputs == "cached"
    train = ctx.loader("train", size, train_cfg.batch_size, train=True, views=cfg.distill.cache_views if cached else None,
                       fraction=cfg.student.train_fraction)
    val = ctx.loader("val", student.img_size, 64)
    labels = (f", on {train.sampler.n} of {len(train.dataset)} training images (student.train_fraction)"
              if cfg.student.train_fraction < 1.0 else "")
    if teacher is None:
        return train, val, StudentTrainee, ce_step(train_cfg.label_smoothing, weights), "from scratch" + labels
    teacher.to(ctx.device)
    cache = _teacher_cache(ctx, teacher, train) if cached else None

    def trainee_of(model: Classifier) -> StudentTrainee:
        # The projector is sized from the model's real features (a pruned student's are narrower).
        return StudentTrainee(model, make_projector(model, teacher) if cfg.distill.loss == "feature" else None)

    step = distill_step(teacher, cfg.distill, label_smoothing=train_cfg.label_smoothing, class_weights=weights,
                        cache=cache, generator=torch.Generator().manual_seed(cfg.run.seed))
    what = (f"distilled ({cfg.distill.loss}, T={cfg.distill.temperature}, alpha={cfg.distill.alpha}, "
            f"mixup={cfg.distill.mixup}, teacher outputs {cfg.distill.teacher_outputs}){labels}")
    return train, val, trainee_of, step, what


def _student_run(ctx: Context, stage: str, teacher: Classifier | None) -> Classifier:
    """Train the student: distilled from ``teacher``, or from scratch when ``teacher`` is None."""
    cfg = ctx.cfg
    stage_dir = ctx.run_dir / stage
    stage_cfg = {"student": to_dict(cfg.student), "data": to_dict(cfg.data), "seed": cfg.run.seed,
                 "distill": to_dict(cfg.distill) if teacher is not None else None}
    done = skip_if_finished(ctx, stage_dir, "student", stage_cfg)
    if done is not None:
        return done
    torch.manual_seed(cfg.run.seed)  # the same initial student for the distilled run and the baseline
    student = build_student(cfg.student)
    train, val, trainee_of, step, what = student_run_parts(ctx, student, teacher, stage_dir)
    ctx.log(f"[{stage}] {cfg.student.arch} at {student.img_size} px, {_count(student):,} params, {what}")
    result = fit(trainee_of(student), step, train, val, cfg.student, stage_dir, device=ctx.device,
                 eval_model=student, channels_last=True, name=stage, config=stage_cfg, dist=ctx.dist, log=ctx.log)
    finish(ctx, student, stage_dir, stage_cfg, result,
           {"distilled_from": "teacher" if teacher is not None else None})
    return student.eval()


def _teacher_cache(ctx: Context, teacher: Classifier, train_loader) -> TeacherCache:
    """The teacher's outputs on the fixed training views, computed once per run and reused by
    the student and prune stages (kept in ``student/teacher_cache.safetensors``)."""
    stage_dir = ctx.run_dir / "student"
    path = stage_dir / "teacher_cache.safetensors"
    key = {"teacher": load_meta(ctx.run_dir / "teacher").get("config_hash"), "views": ctx.cfg.distill.cache_views,
           "seed": ctx.cfg.run.seed, "size": train_loader.dataset.size}
    if path.is_file():
        cache, meta = TeacherCache.load(path)
        if meta == key:
            return cache
    ctx.log(f"[distill] caching teacher outputs for {ctx.cfg.distill.cache_views} views of "
            f"{len(train_loader.dataset)} training images")
    cache = build_teacher_cache(teacher, train_loader.dataset, train_loader.sampler, device=ctx.device,
                                batch_size=64, precision=precision_for(ctx.device, True))
    if ctx.dist.is_main:  # under torchrun every rank computes the same cache; one writes it
        stage_dir.mkdir(parents=True, exist_ok=True)
        cache.save(path, key)
    return cache


def student_stage(ctx: Context, teacher: Classifier) -> Classifier:
    """Distil the teacher into the student."""
    return _student_run(ctx, "student", teacher)


def baseline_stage(ctx: Context) -> Classifier:
    """The same student trained without the teacher: what distillation bought, measured."""
    return _student_run(ctx, "student_baseline", None)
