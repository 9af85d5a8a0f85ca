"""The prune stage: prune the distilled student to a cost target and distil it again.

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
from safetensors.torch import load_file, save_file

from core.files import atomic_write, atomic_write_rows, atomic_write_text
from distill.losses import cross_entropy
from distill.stages import Context, begin, finish, learned_from, student_run_parts
from student.latency_target import LatencySettings, SubprocessTimer, final_check, stage_latency_search
from student.prune import StudentPruner
from training.distributed import barrier
from training.loop import fit
from training.modeling import Classifier

__all__ = ["prune_stage"]


def prune_stage(ctx: Context, teacher: Classifier, student: Classifier) -> Classifier:
    """Prune the distilled student in rounds, each recovered by distillation from the teacher."""
    cfg = ctx.cfg
    stage_dir, record, done = begin(ctx, "student_pruned")
    target_ms = cfg.prune.target.get("latency_ms")
    if done is not None:
        return done
    model = copy.deepcopy(student).cpu().train()
    example = torch.zeros(1, 3, model.img_size, model.img_size)
    train, val, trainee_of, step, _ = student_run_parts(ctx, model, teacher, stage_dir, cfg.prune)
    search = timer = None
    if target_ms is not None:
        latency = LatencySettings.from_config(cfg.constraints, cfg.profile)
        timer = SubprocessTimer(latency, log=ctx.log)
        search = stage_latency_search(stage_dir, model.net, example, cfg.prune, timer, config=record["config"],
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
        done_round = pruner.rounds[k - 1]
        epochs = cfg.prune.epochs if k == cfg.prune.steps else cfg.prune.finetune_epochs
        ctx.log(f"[prune] round {k}/{cfg.prune.steps}: channel ratio {done_round['ratio']:.3f}, MACs "
                f"{done_round['macs_before'] / 1e6:.1f} M -> {done_round['macs_after'] / 1e6:.1f} M, params "
                f"{done_round['params_before'] / 1e6:.2f} M -> {done_round['params_after'] / 1e6:.2f} M; "
                f"{epochs} epoch(s) of distillation")
        round_cfg = dataclasses.replace(cfg.prune, epochs=epochs)
        round_record = {**record, "config": {**record["config"], "round": k}}
        result = fit(trainee_of(model), step, train, val, round_cfg, round_dir, device=ctx.device, eval_model=model,
                     channels_last=True, name=f"prune round {k}", record=round_record, dist=ctx.dist, log=ctx.log)
        model.cpu()
    if ctx.dist.is_main:
        atomic_write_rows(stage_dir / "metrics.csv", _round_rows(stage_dir, pruner.rounds))
    structure = pruner.structure()
    finish(ctx, model, stage_dir, record, result,
           {"learned_from": learned_from(train), "pruning": structure, "cost": {"macs_unpruned": structure["macs"][0], "macs": structure["macs"][1],
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
    """Cross-entropy on one training batch (its labeled images), for Taylor importance's gradients."""
    def loss_fn(net: torch.nn.Module) -> torch.Tensor:
        images, labels = next(iter(train_loader))[:2]
        device = next(net.parameters()).device
        return cross_entropy(net(model.view(images.to(device))), labels.to(device))
    return loss_fn
