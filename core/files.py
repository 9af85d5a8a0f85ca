"""Writing files so that a kill never leaves half of one: a hidden temporary name, then a rename.

Every file the pipeline writes goes through :func:`atomic_write`. The temporary name is
``.<name>.<pid>.tmp`` beside the target, so a rerun can find and delete what a killed run left.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_rows", "is_partial", "json_ready", "read_yaml_mapping"]


_OS_ERROR = re.compile(r"os error (\d+)")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    A failed write (a full disk, a read-only folder) raises ``OSError`` naming ``path``, whatever
    the writing library raised (torch and safetensors report a full disk with their own types),
    and the file that was there before is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except Exception as exc:
        code = _OS_ERROR.search(str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV with a header of every key that appears in ``rows`` (in order of first appearance)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def is_partial(path: Path) -> bool:
    """A leftover of an interrupted write: a temporary file, or a temporary export folder."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith((".export-", ".quantize-")))


def json_ready(value: Any) -> Any:
    """NaN and infinity become null (JSON has no spelling for them); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_yaml_mapping(path: Path, expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (read with ``yaml.safe_load``: plain values only);
    a syntax error or another shape is a :class:`UserError` naming the file and ``expected``."""
    import yaml

    from core.errors import UserError

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: must be a mapping with {expected}, got {type(doc).__name__}")
    return doc
