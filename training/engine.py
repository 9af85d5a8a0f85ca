"""One epoch of training and one pass of evaluation (deit's ``engine.py``, for every stage).

A stage differs from another only by its model and its *step*: a function from a batch to a dict
of named losses (``{"loss": total, "ce": ..., "kd": ...}``). The loop does the rest: mixed
precision, backward, clipping, optimizer and schedule, EMA, throughput, non-finite checks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.errors import UserError

__all__ = ["Batch", "StepFn", "Precision", "pick_device", "precision_for", "train_one_epoch", "evaluate",
           "EvalOutput", "NonFiniteLoss"]

#: (images in [0, 1], labels (-1: unlabeled), dataset indices, view seeds), as the loaders yield
#: them; a distillation loader adds a fifth element, the teacher's own view of the same images.
Batch = tuple[torch.Tensor, ...]
#: ``step(model, batch) -> {"loss": total, ...named terms}``; ``model`` is the module being trained
#: (wrapped in DistributedDataParallel under torchrun), so the step must call it, not a copy.
StepFn = Callable[[nn.Module, Batch], dict[str, torch.Tensor]]


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; or the one asked for (an error if it is absent)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA GPU is visible; use run.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("run.device=mps but Apple MPS is not available; use run.device=auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) and whether fp16 needs a gradient scaler."""

    dtype: torch.dtype | None
    scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def precision_for(device: torch.device, amp: bool) -> Precision:
    """Mixed precision on CUDA only: bf16 where supported, else fp16 with a grad scaler."""
    if not amp or device.type != "cuda":
        return Precision(None, False)
    # Native bf16 only (Ampere and later): a T4 'supports' it through emulation, slowly.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Precision(torch.bfloat16, False)
    return Precision(torch.float16, True)


def _to(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    images, labels, index, views, *extra = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    extra = [x.to(device, non_blocking=True) for x in extra]  # the teacher's view: the teacher's own layout
    return (images, labels.to(device, non_blocking=True), index, views, *extra)


def train_one_epoch(
    model: nn.Module,
    step: StepFn,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    precision: Precision,
    scaler: torch.amp.GradScaler | None,
    ema=None,
    ema_source: nn.Module | None = None,
    grad_clip: float | None = None,
    epoch: int = 0,
    updates_done: int = 0,
    desc: str = "train",
    channels_last: bool = False,
    params: list[torch.nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean loss terms, lr and images/s.

    ``ema_source`` is the module whose weights the EMA follows (the classifier, when ``model``
    also carries loss-only parts such as a feature projector).
    """
    model.train()
    params = params if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, dynamic_ncols=True,
               disable=None)  # None: bars on a terminal only (Colab runs commands in one)
    for i, batch in enumerate(bar):
        batch = _to(batch, device, channels_last)
        with precision.autocast(device):
            losses = step(model, batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"the {desc} loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; stopped. The last good "
                "checkpoint is kept. Lower the learning rate, set grad_clip, or check the data for broken images"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        updates_done += 1
        scheduler.step_update(num_updates=updates_done)
        if ema is not None:
            ema.update(ema_source if ema_source is not None else model, step=updates_done)
        n = batch[0].shape[0]
        seen += n
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    out = {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
    out["lr"] = max(g["lr"] for g in optimizer.param_groups)
    out["train_images_per_s"] = seen / max(elapsed, 1e-9)
    out["train_time_s"] = elapsed
    return out


@dataclass
class EvalOutput:
    """Per-image outputs of one evaluation pass, in loader order."""

    logits: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Probability of *defect* (class 1)."""
        return self.logits.float().softmax(dim=1)[:, 1]

    @property
    def loss(self) -> float:
        return float(F.cross_entropy(self.logits.float(), self.labels)) if len(self.labels) else math.nan


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, device: torch.device, precision: Precision = Precision(None, False),
             desc: str = "eval", channels_last: bool = False) -> EvalOutput:
    """Logits of every image in ``loader`` (no augmentation, loader order)."""
    model.eval()
    logits, labels, index = [], [], []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, dynamic_ncols=True, disable=None)
    for batch in bar:
        images, y, idx, *_ = _to(batch, device, channels_last)
        with precision.autocast(device):
            out = model(images)
        logits.append(out.float().cpu())
        labels.append(y.cpu())
        index.append(idx)
    if not logits:
        return EvalOutput(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return EvalOutput(torch.cat(logits), torch.cat(labels), torch.cat(index))
