"""The stages the runner calls, each taking what the previous one made and returning its artifact.

Every model stage is judged by its provenance record (:mod:`core.provenance`, ``<stage>/stage.json``,
written last): made with the same config from the same inputs, it is loaded, not rerun; made with
another config, the run refuses (results of two configs must not mix); made from an input that has
changed since (a retrained or replaced teacher under a student), it is stale and redone. Otherwise
``fit`` resumes from ``last.ckpt`` if there is one. Every finished model gets the same treatment
(:func:`finish`): predictions on every split, a decision threshold chosen on validation only, test
metrics at that threshold, ``model.safetensors`` + ``meta.json``, then the record.

With ``data.tiles`` a model learns from and is scored on tiles (``PreparedData.unit_loader``), and
is judged at two levels: tiles (the labelled ones; ``meta.json`` ``metrics``, ``predictions.csv``)
and images, each image scored by its worst tile (``meta.json`` ``image``, ``image_predictions.csv``),
each level with its own threshold chosen on its own validation scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import provenance
from core.errors import UserError
from core.rundir import IMAGE_PREDICTIONS, PREDICTIONS, RECORD, STAGE_OF, WEIGHTS, RunDir, write_predictions
from core.schema import to_dict
from data import CLASS_NAMES
from data.manifest import SPLITS, UNLABELED
from data.prepare import PreparedData
from data.tiles import worst_tiles
from distill.config import Config
from distill.steps import StudentTrainee, ce_step, distill_step, make_projector
from distill.teacher_cache import TeacherCache, build_teacher_cache
from profiling.report.quality import binary_metrics
from profiling.report.thresholds import choose_threshold
from student.model import build_student
from teacher.model import build_teacher, teacher_optimizer
from training.config import TrainConfig
from training.distributed import SINGLE, Dist, barrier, gather_eval
from training.engine import EvalOutput, evaluate, precision_for
from training.loop import FitResult, fit
from training.modeling import Classifier, load_model, save_artifact

__all__ = ["Context", "StaleWarning", "teacher_stage", "student_stage", "baseline_stage", "finish", "stage_record",
           "check_finished_stages", "begin", "finished_or_none", "learned_from", "levels", "image_outputs",
           "image_level", "tiling_meta", "write_levels"]


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    data: PreparedData
    device: torch.device
    log: Callable[[str], None] = print
    dist: Dist = SINGLE

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    def loader(self, split: str | tuple[str, ...], size: int, batch_size: int, *, train: bool = False,
               views: int | None = None, teacher_size: int | None = None, epoch_length: int | None = None,
               every_tile: bool = False):
        """This process's loader of images or, with ``data.tiles``, tiles (``PreparedData.unit_loader``):
        under torchrun, its shard of every batch (``batch_size`` is global)."""
        return self.data.unit_loader(split, size, self.dist.shard_batch(batch_size), train=train, views=views,
                                     teacher_size=teacher_size, num_replicas=self.dist.world, rank=self.dist.rank,
                                     epoch_length=epoch_length, every_tile=every_tile)


# ----------------------------------------------------------------------------- provenance
def stage_config(cfg: Config, name: str) -> dict[str, Any]:
    """The settings a model directory's stage reads: what its record compares on a rerun."""
    common = {"data": to_dict(cfg.data), "seed": cfg.run.seed}
    if name == "teacher":
        return {"teacher": to_dict(cfg.teacher), **common}
    if name == "student":
        return {"student": to_dict(cfg.student), "distill": to_dict(cfg.distill), **common}
    if name == "student_baseline":
        return {"student": to_dict(cfg.student), "distill": None, **common}
    if name == "student_pruned":
        out = {"prune": to_dict(cfg.prune), "distill": to_dict(cfg.distill), **common}
        if "latency_ms" in cfg.prune.target:  # where the target is measured is part of what the stage made
            from student.latency_target import LatencySettings

            out["latency"] = dataclasses.asdict(LatencySettings.from_config(cfg.constraints, cfg.profile))
        return out
    raise ValueError(f"no stage makes a model directory named {name!r}")


#: The model directories each one is made from (their weights are its inputs, with the data split).
UPSTREAM: dict[str, tuple[str, ...]] = {"teacher": (), "student": ("teacher",), "student_baseline": (),
                                        "student_pruned": ("teacher", "student")}


def stage_record(ctx: Context, name: str) -> dict[str, Any]:
    """The provenance record model directory ``name`` would get now: its config, and the digests of
    the split manifest and of the weights of the models it is made from."""
    run = ctx.run
    inputs: dict[str, Path] = {"manifest": run.manifest}
    inputs.update({up: run.weights(up) for up in UPSTREAM[name]})
    return provenance.make(name, stage_config(ctx.cfg, name), inputs)


def _config_refusal(run: RunDir, name: str, changed: list[str]) -> UserError:
    stage = STAGE_OF[name]
    return UserError(
        f"'{run.model(name)}' was made with a different config (changed: {', '.join(changed[:8])}); results of "
        f"two configs must not mix, and config.yaml must not claim settings its models were not made with. "
        f"Redo it with --stages {stage},... --force {stage} (this redoes the stages after it too), restore the "
        "config, or choose a new run.name")


class StaleWarning(UserWarning):
    """A kept model was made from an artifact that has changed since."""


def check_finished_stages(ctx: Context, running: set[str]) -> None:
    """Refuse a run that would build on, or report, a finished model made with another config in a
    stage this run does not redo (config.yaml would claim settings it was not made with); warn
    about one made from an input that has changed since (it is stale until its stage runs)."""
    run = ctx.run
    for name, stage in STAGE_OF.items():
        if stage in running or not run.record(name).is_file():
            continue
        verdict = provenance.check(run.record(name), stage_record(ctx, name))
        if verdict.state == "config":
            raise _config_refusal(run, name, verdict.changed)
        if verdict.state == "inputs":
            warnings.warn(f"the {' and the '.join(verdict.changed)} that '{run.model(name)}' was made from changed "
                          f"since (retrained or replaced): it is stale until --stages {stage} redoes it",
                          StaleWarning, stacklevel=2)


def begin(ctx: Context, name: str) -> tuple[Path, dict[str, Any], Classifier | None]:
    """A model stage's directory, its provenance record now, and its finished model if that record
    matches (None: the stage must run)."""
    record = stage_record(ctx, name)
    return ctx.run.model(name), record, finished_or_none(ctx, name, record)


def finished_or_none(ctx: Context, name: str, record: dict[str, Any]) -> Classifier | None:
    """The finished model of directory ``name`` if its record matches ``record``; None when it must
    be (re)made. A stale one (an input changed) is cleared first; a config change is refused."""
    run, stage_dir = ctx.run, ctx.run.model(name)
    verdict = provenance.check(run.record(name), record)
    if verdict.state == "new":
        return None  # never finished (fit resumes from last.ckpt, which checks the same record)
    if verdict.state == "config":
        raise _config_refusal(run, name, verdict.changed)
    if verdict.state == "inputs":
        ctx.log(f"[{name}] the {' and the '.join(verdict.changed)} changed since it was made: redoing it")
        barrier(ctx.dist)
        if ctx.dist.is_main:
            shutil.rmtree(stage_dir)
        barrier(ctx.dist)
        return None
    model = load_model(stage_dir)
    if verdict.state == "outputs":  # its weights were replaced by hand: score what is there now
        ctx.log(f"[{name}] {', '.join(verdict.changed)} changed since the stage wrote it: predicting, choosing the "
                "threshold and scoring again with the weights that are there now")
        meta = run.read_meta(name)
        keep = {k: meta[k] for k in ("conv_stem", "pruning", "cost", "distilled_from", "learned_from") if k in meta}
        finish(ctx, model, stage_dir, record, None, keep)
        return model.eval()
    test = run.read_meta(name)["metrics"]["test"]
    ctx.log(f"[{name}] finished earlier (test AUROC {test['auroc']:.4f}); skipped — use --force {STAGE_OF[name]} "
            "to redo it")
    return model


# ----------------------------------------------------------------------------- finishing
def _prediction_rows(outputs: dict[str, EvalOutput], data: PreparedData, images: bool):
    for split, out in outputs.items():
        samples = data.split(split) if images else data.unit_samples(split, every_tile=True)
        for i, label, prob, logit in zip(out.index.tolist(), out.labels.tolist(), out.probs.tolist(),
                                         out.logits.tolist()):
            yield split, i, samples[i].path, label, prob, logit[0], logit[1]


def write_split_predictions(path: Path, outputs: dict[str, EvalOutput], data: PreparedData, *,
                            images: bool = False) -> None:
    """``predictions.csv`` of one model: every image (or labelled tile) of every split with its score
    and logits; ``images=True`` for the image level of a tiled run (:func:`image_outputs`)."""
    write_predictions(path, _prediction_rows(outputs, data, images))


def _labelled(out: EvalOutput) -> EvalOutput:
    keep = out.labels >= 0
    return EvalOutput(out.logits[keep], out.labels[keep], out.index[keep])


def image_outputs(data: PreparedData, split: str, out: EvalOutput) -> EvalOutput:
    """The image level of one split's tile outputs (every tile, slivers too): each image of the
    split with the logits of its worst tile, so its probability of defect is the maximum over its
    tiles (:func:`data.tiles.image_scores`), and the image's own label."""
    parents = data.tile_parents(split, include_excluded=True)[out.index]
    labels = data.labels(split)
    worst = torch.from_numpy(worst_tiles(out.probs, parents, len(labels)))
    return EvalOutput(out.logits[worst], labels, torch.arange(len(labels)))


def levels(data: PreparedData, outputs: dict[str, EvalOutput]) -> tuple[dict[str, EvalOutput],
                                                                         dict[str, EvalOutput] | None]:
    """The outputs a model is scored on: without tiles, the images and None; with tiles, the labelled
    tiles and the images (worst tile). ``outputs`` come from ``unit_loader(..., every_tile=True)``."""
    if not data.tiled:
        return outputs, None
    return ({sp: _labelled(o) for sp, o in outputs.items()},
            {sp: image_outputs(data, sp, o) for sp, o in outputs.items()})


def tiling_meta(data: PreparedData) -> dict[str, Any]:
    """How a tiled model cuts an image (``meta.json`` and the ONNX metadata carry it to predict)."""
    t = data.cfg.tiles
    per_image = ((data.report.get("tiles") or {}).get("tiles_per_image") or {}).get("max")
    return {"grid": list(t.grid) if t.grid else None, "size": t.size, "overlap": t.overlap,
            "tiles_per_image": per_image}


def image_level(images: dict[str, EvalOutput], rule: str) -> dict[str, Any]:
    """``meta.json`` ``image`` of a tiled model: the image threshold ``rule`` picks from the
    validation images' scores (never test), and every split's image metrics at it."""
    choice = choose_threshold(images["val"].probs, images["val"].labels, rule)
    return {"threshold": choice.threshold, "threshold_rule": rule,
            "threshold_on_val": {"recall": choice.recall, "specificity": choice.specificity, "f1": choice.f1},
            "score": "the maximum of its tiles' probabilities of defect",
            "metrics": {sp: binary_metrics(o.probs, o.labels, choice.threshold) for sp, o in images.items()}}


def write_levels(stage_dir: Path, tiles: dict[str, EvalOutput], images: dict[str, EvalOutput] | None,
                 data: PreparedData, *, predictions: Path | None = None, image_predictions: Path | None = None) -> None:
    """``predictions.csv`` (images, or labelled tiles) and, with tiles, ``image_predictions.csv``."""
    write_split_predictions(predictions or stage_dir / PREDICTIONS, tiles, data)
    if images is not None:
        write_split_predictions(image_predictions or stage_dir / IMAGE_PREDICTIONS, images, data, images=True)


def finish(ctx: Context, model: Classifier, stage_dir: Path, record: dict[str, Any], result: FitResult | None,
           extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every split, choose the threshold on validation, score test, save the artifact and
    then its provenance ``record``.

    Evaluation runs in fp32 whatever ``amp`` says: the exported fp32 model is what gets deployed
    with this threshold, so the threshold must be chosen on the scores that model gives.
    """
    cfg = ctx.cfg
    model.to(ctx.device).eval()
    scored = {sp: gather_eval(evaluate(model, ctx.loader(sp, model.img_size, 64, every_tile=True), device=ctx.device,
                                       desc=f"{stage_dir.name} predict {sp}"), ctx.dist)
              for sp in SPLITS}
    outputs, images = levels(ctx.data, scored)
    choice = choose_threshold(outputs["val"].probs, outputs["val"].labels, cfg.eval.threshold)
    metrics = {sp: binary_metrics(out.probs, out.labels, choice.threshold) for sp, out in outputs.items()}
    tiled = {} if images is None else {"unit": "tile", "tiles": tiling_meta(ctx.data),
                                       "image": image_level(images, cfg.eval.threshold)}
    meta = {
        "stage": stage_dir.name,
        "threshold": choice.threshold,
        "threshold_rule": cfg.eval.threshold,
        "threshold_on_val": {"recall": choice.recall, "specificity": choice.specificity, "f1": choice.f1},
        "metrics": metrics,
        "best_epoch": result.best_epoch if result else None,
        "epochs_run": len(result.history) if result else 0,
        "crop_pct": cfg.data.crop_pct,
        "class_names": list(CLASS_NAMES),
        **tiled,
        **(extra_meta or {}),
    }
    if ctx.dist.is_main:
        write_levels(stage_dir, outputs, images, ctx.data)
        save_artifact(stage_dir, model.cpu(), meta)
        provenance.save(stage_dir / RECORD, provenance.finish(record, stage_dir, [WEIGHTS]))
    barrier(ctx.dist)
    test = metrics["test"]
    ctx.log(f"[{stage_dir.name}] test AUROC {test['auroc']:.4f}  F1 {test['f1']:.4f}  recall {test['recall']:.4f}  "
            f"at threshold {choice.threshold:.4f} ({cfg.eval.threshold} on val)" + (" — tiles" if tiled else ""))
    if tiled:
        image = tiled["image"]
        test = image["metrics"]["test"]
        ctx.log(f"[{stage_dir.name}] images (worst tile): test AUROC {test['auroc']:.4f}  F1 {test['f1']:.4f}  "
                f"recall {test['recall']:.4f} at threshold {image['threshold']:.4f} "
                f"({cfg.eval.threshold} on val images)")
    return meta


# ----------------------------------------------------------------------------- teacher
def teacher_stage(ctx: Context) -> Classifier:
    """Fine-tune (or train from scratch) the teacher."""
    cfg = ctx.cfg
    stage_dir, record, done = begin(ctx, "teacher")
    if done is not None:
        return done
    model = build_teacher(cfg.teacher)
    weights = ctx.data.class_weights() if cfg.data.class_weighted_loss else None
    train = ctx.loader("train", model.img_size, cfg.teacher.batch_size, train=True)
    val = ctx.loader("val", model.img_size, 64)
    stem = ", convolutional stem" if cfg.teacher.conv_stem else ""
    ctx.log(f"[teacher] {cfg.teacher.arch}{stem} at {model.img_size} px, {_count(model):,} params, "
            f"{'pretrained' if cfg.teacher.pretrained or cfg.teacher.weights else 'from scratch'}, "
            f"{cfg.teacher.epochs} epochs on {ctx.device.type}, on {len(train.dataset)} labeled training "
            f"{'tiles' if ctx.data.tiled else 'images'}")
    result = fit(model, ce_step(cfg.teacher.label_smoothing, weights), train, val, cfg.teacher, stage_dir,
                 device=ctx.device, optimizer_factory=teacher_optimizer(cfg.teacher), name="teacher",
                 record=record, dist=ctx.dist, log=ctx.log)
    finish(ctx, model, stage_dir, record, result, {"conv_stem": cfg.teacher.conv_stem, "learned_from": learned_from(train)})
    return model.eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def learned_from(train_loader) -> dict[str, Any]:
    """How many labeled and unlabeled images (or tiles: ``unit``) a training loader draws from
    (meta.json and the report)."""
    unlabeled = int((train_loader.dataset.labels < 0).sum())
    out: dict[str, Any] = {"labeled": len(train_loader.dataset) - unlabeled, "unlabeled": unlabeled}
    if getattr(train_loader.dataset, "parents", None) is not None:  # a TileDataset: counts of tiles
        out["unit"] = "tiles"
    return out


# ----------------------------------------------------------------------------- student
def student_run_parts(ctx: Context, student: Classifier, teacher: Classifier | None, stage_dir: Path,
                      train_cfg: TrainConfig | None = None):
    """Loaders, trainee maker, step and a description for training ``student`` (distilled from
    ``teacher``, or from scratch when it is None). Shared by the student and prune stages;
    ``train_cfg`` (default ``cfg.student``) gives the batch size and label smoothing."""
    cfg = ctx.cfg
    train_cfg = train_cfg or cfg.student
    weights = ctx.data.class_weights() if cfg.data.class_weighted_loss else None
    cached = teacher is not None and cfg.distill.teacher_outputs == "cached"
    # With a teacher, the student learns from every training image, labeled or not (the teacher's
    # outputs are its targets on all of them); on its own, from the labeled ones only. The teacher
    # gets its own view of each image at its own resolution (data/loader.py).
    # On the labeled images alone, an epoch still has one draw per training image, labeled or not:
    # the same number of updates as a student distilled on all of them, so that a comparison of the
    # two is not one of training length.
    pool = teacher is not None and cfg.distill.unlabeled
    splits = ("train", UNLABELED) if pool else ("train",)
    teacher_size = teacher.img_size if teacher is not None and teacher.img_size != student.img_size else None
    n_unlabeled = len(ctx.data.split(UNLABELED))
    epoch_length = len(ctx.data.split("train")) + n_unlabeled if not pool and n_unlabeled else None
    train = ctx.loader(splits, student.img_size, train_cfg.batch_size, train=True, teacher_size=teacher_size,
                       views=cfg.distill.cache_views if cached else None, epoch_length=epoch_length)
    val = ctx.loader("val", student.img_size, 64)
    seen = learned_from(train)
    labels = f", on {seen['labeled']} labeled" + (f" and {seen['unlabeled']} unlabeled" if seen["unlabeled"] else "") \
        + (" training tiles" if ctx.data.tiled else " training images")
    if epoch_length:
        labels += f" ({epoch_length} draws an epoch, as many updates as the distilled student)"
    if teacher is None:  # the baseline: the distilled student's recipe, mixup included, without the teacher
        step = ce_step(train_cfg.label_smoothing, weights, mixup_alpha=cfg.distill.mixup,
                       generator=torch.Generator().manual_seed(cfg.run.seed))
        mixed = f" (mixup={cfg.distill.mixup})" if cfg.distill.mixup > 0 else ""
        return train, val, StudentTrainee, step, "from scratch" + mixed + labels
    teacher.to(ctx.device)
    cache = None
    if cached:
        cache = _teacher_cache(ctx, teacher, train)
        train.dataset.teacher_view = False  # the cache holds the teacher's outputs on its views

    def trainee_of(model: Classifier) -> StudentTrainee:
        # The projector is sized from the model's real features (a pruned student's are narrower).
        return StudentTrainee(model, make_projector(model, teacher) if cfg.distill.loss == "feature" else None)

    step = distill_step(teacher, cfg.distill, label_smoothing=train_cfg.label_smoothing, class_weights=weights,
                        cache=cache, generator=torch.Generator().manual_seed(cfg.run.seed))
    what = (f"distilled ({cfg.distill.loss}, T={cfg.distill.temperature}, alpha={cfg.distill.alpha}, "
            f"mixup={cfg.distill.mixup}, teacher outputs {cfg.distill.teacher_outputs}){labels}")
    return train, val, trainee_of, step, what


def _student_run(ctx: Context, name: str, teacher: Classifier | None) -> Classifier:
    """Train the student: distilled from ``teacher``, or from scratch when ``teacher`` is None."""
    cfg = ctx.cfg
    stage_dir, record, done = begin(ctx, name)
    if done is not None:
        return done
    torch.manual_seed(cfg.run.seed)  # the same initial student for the distilled run and the baseline
    student = build_student(cfg.student)
    train, val, trainee_of, step, what = student_run_parts(ctx, student, teacher, stage_dir)
    ctx.log(f"[{name}] {cfg.student.arch} at {student.img_size} px, {_count(student):,} params, {what}")
    result = fit(trainee_of(student), step, train, val, cfg.student, stage_dir, device=ctx.device,
                 eval_model=student, channels_last=True, name=name, record=record, dist=ctx.dist, log=ctx.log)
    finish(ctx, student, stage_dir, record, result, {"distilled_from": "teacher" if teacher is not None else None,
                                                     "learned_from": learned_from(train)})
    return student.eval()


def _teacher_cache(ctx: Context, teacher: Classifier, train_loader) -> TeacherCache:
    """The teacher's outputs on the fixed training views, computed once per run and reused by
    the student and prune stages (kept in ``student/teacher_cache.safetensors``, with a provenance
    record: the teacher's weights, the split, the views; any change computes it again)."""
    path = ctx.run.model("student") / "teacher_cache.safetensors"
    dataset = train_loader.dataset
    views = train_loader.sampler.views  # cache_views, times the passes of an epoch over few labeled images
    record = provenance.make("teacher_cache", {"views": views, "seed": ctx.cfg.run.seed,
                                               "size": dataset.size, "teacher_size": dataset.teacher_size,
                                               "images": hashlib.sha256("\n".join(
                                                   s.path for s in dataset.samples).encode()).hexdigest()},
                             {"teacher": ctx.run.weights("teacher"), "manifest": ctx.run.manifest})
    if path.is_file():
        cache, saved = TeacherCache.load(path)
        if provenance.compare(saved, record).same:
            return cache
    ctx.log(f"[distill] caching teacher outputs for {views} views of "
            f"{len(train_loader.dataset)} training {'tiles' if ctx.data.tiled else 'images'}")
    cache = build_teacher_cache(teacher, train_loader.dataset, train_loader.sampler, device=ctx.device,
                                batch_size=64, precision=precision_for(ctx.device, ctx.cfg.teacher.amp))
    if ctx.dist.is_main:  # under torchrun every rank computes the same cache; one writes it
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save(path, record)
    return cache


def student_stage(ctx: Context, teacher: Classifier) -> Classifier:
    """Distil the teacher into the student."""
    return _student_run(ctx, "student", teacher)


def baseline_stage(ctx: Context) -> Classifier:
    """The same student trained without the teacher: what distillation bought, measured."""
    return _student_run(ctx, "student_baseline", None)
