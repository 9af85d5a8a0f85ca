"""What made a stage's output: its config and the identity of every artifact it consumed.

One mechanism answers "is this stage done, with the same config, from the same inputs?" for every
stage of a run (data, each model, the teacher-output cache, export, profile) and for a resumed
checkpoint. A *record* is plain JSON::

    {"stage": "student",
     "config": {...the settings the stage reads...},
     "inputs": {"teacher": "<sha256 of teacher/model.safetensors>", "manifest": "<sha256>"},
     "outputs": {"model.safetensors": "<sha256>"}}

:func:`make` builds the record a stage would write now (hashing its input files);
:func:`compare` sets it against the saved one and says what differs: the stage's own config
(results of two configs must not mix: the caller refuses or redoes it, by its own rule), its inputs
(an upstream artifact was retrained or replaced: the stage is stale), or its outputs (a file the
stage wrote was replaced by hand). A stage writes its record last, so its presence marks the stage
finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import atomic_write_text
from core.schema import changed_keys

__all__ = ["Verdict", "digest", "make", "compare", "load", "save", "finish", "check"]

_CHUNK = 1 << 20
_digests: dict[tuple[str, int, int], str] = {}


def digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cached per path, size and modification time within a process)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _plain(value: Any) -> Any:
    """The JSON form a record is compared in (tuples become lists, paths and the like become text)."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def make(stage: str, config: Any, inputs: Mapping[str, str | Path | None] | None = None) -> dict[str, Any]:
    """The record of ``stage`` made now with ``config`` from ``inputs`` (files are hashed; a string
    that is not an existing file is taken as an identity already, e.g. a digest; None: absent)."""
    ids: dict[str, str | None] = {}
    for name, value in (inputs or {}).items():
        if isinstance(value, Path) or (isinstance(value, str) and Path(value).is_file()):
            ids[name] = digest(value) if Path(value).is_file() else None
        else:
            ids[name] = value
    return {"stage": stage, "config": _plain(config), "inputs": ids}


@dataclass(frozen=True)
class Verdict:
    """How a saved record relates to the one made now.

    ``state``: ``new`` (nothing saved), ``same``, ``config`` (the stage's own config differs; ``changed``
    lists the dotted keys), ``inputs`` (an input artifact differs; ``changed`` names them), or
    ``outputs`` (a file the stage wrote no longer has the digest it was written with).
    """

    state: str
    changed: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.state == "same"


def compare(saved: Mapping[str, Any] | None, now: Mapping[str, Any], stage_dir: Path | None = None) -> Verdict:
    """Set ``now`` against ``saved``: config first, then inputs, then (with ``stage_dir``) outputs."""
    if not saved:
        return Verdict("new")
    old_cfg, new_cfg = saved.get("config"), _plain(now.get("config"))
    if old_cfg != new_cfg:
        keys = changed_keys(old_cfg, new_cfg) if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) else []
        return Verdict("config", keys or ["config"])
    old_in, new_in = saved.get("inputs") or {}, now.get("inputs") or {}
    inputs = sorted(k for k in old_in.keys() | new_in.keys() if old_in.get(k) != new_in.get(k))
    if inputs:
        return Verdict("inputs", inputs)
    if stage_dir is not None:
        outputs = sorted(name for name, sha in (saved.get("outputs") or {}).items()
                         if not (stage_dir / name).is_file() or digest(stage_dir / name) != sha)
        if outputs:
            return Verdict("outputs", outputs)
    return Verdict("same")


def load(path: Path) -> dict[str, Any] | None:
    """The record saved at ``path``; None when there is none (or it is unreadable: the stage redoes)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def finish(record: Mapping[str, Any], stage_dir: Path, outputs: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """``record`` with the digests of the files the stage wrote (names relative to ``stage_dir``)."""
    return {**record, "outputs": {name: digest(stage_dir / name) for name in outputs if (stage_dir / name).is_file()}}


def save(path: Path, record: Mapping[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(record, indent=2, sort_keys=True))


def check(path: Path, now: Mapping[str, Any]) -> Verdict:
    """:func:`compare` of the record at ``path`` (outputs relative to its folder) with ``now``."""
    return compare(load(path), now, Path(path).parent)
