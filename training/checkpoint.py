"""Resumable training state: written atomically every epoch, read back without unpickling code.

``last.ckpt`` holds plain tensors, numbers, strings and containers only (model, optimizer,
scheduler, grad scaler, EMA, epoch, history, RNG states), so ``torch.load(weights_only=True)``
reads it; a file carrying pickled objects is refused rather than executed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def _save(state: dict[str, Any], path: Path) -> None:
    # Through a Python file object: a full disk is then an OSError, not torch's own RuntimeError.
    with open(path, "wb") as fh:
        torch.save(state, fh)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file and rename; on failure the previous checkpoint stays intact."""
    try:
        atomic_write(path, lambda p: _save(state, p))
    except OSError as exc:
        raise UserError(
            f"cannot write checkpoint '{path}': {exc.strerror or exc} — free disk space or choose a writable "
            f"run.output_dir; the previous checkpoint, if any, is intact"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: data only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for damage
        raise UserError(
            f"checkpoint '{path}' cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "it is damaged or holds pickled objects. Delete it (or use --force STAGE) to retrain the stage"
        ) from None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
