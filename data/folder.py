"""Class folders: ``root/<class>/*`` (the pipeline splits) or ``root/{train,val,test}/<class>/*``."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from data.manifest import Sample, SkippedFile
from data.yolo import IMAGE_EXTENSIONS

__all__ = ["read_folder"]

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _class_of(name: str, defect: list[str], normal: list[str]) -> int | None:
    low = name.lower()
    if low in (d.lower() for d in defect):
        return 1
    if low in (n.lower() for n in normal):
        return 0
    return None


def _read_classes(folder: Path, split: str | None, defect: list[str], normal: list[str],
                  samples: list[Sample], skipped: list[SkippedFile]) -> None:
    unknown = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = _class_of(sub.name, defect, normal)
        if label is None:
            unknown.append(sub.name)
            continue
        for p in sorted(sub.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append(Sample(str(p), label, p.stem, split, f"folder {sub.name}"))
            else:
                skipped.append(SkippedFile(str(p), f"not an image extension ({p.suffix or 'none'})"))
    for p in sorted(q for q in folder.iterdir() if q.is_file()):
        skipped.append(SkippedFile(str(p), "not inside a class folder"))
    if unknown:
        raise UserError(
            f"{folder}: folder(s) {unknown} are neither defect {defect} nor normal {normal}; "
            "rename them or set data.defect_folders / data.normal_folders"
        )


def read_folder(root: str | Path, defect_folders: list[str], normal_folders: list[str]) -> tuple[list[Sample], list[SkippedFile]]:
    """Samples from class folders; ``split`` is set when the root holds train/val/test folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist (data.path)")
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    split_dirs = {p: _SPLIT_NAMES[p.name.lower()] for p in subdirs if p.name.lower() in _SPLIT_NAMES}
    if split_dirs:
        others = [p.name for p in subdirs if p not in split_dirs]
        if others:
            raise UserError(f"{root}: holds split folders {sorted(p.name for p in split_dirs)} and also {others}; "
                            "use either root/<class>/ or root/{train,val,test}/<class>/")
        for folder, split in sorted(split_dirs.items(), key=lambda kv: kv[1]):
            _read_classes(folder, split, defect_folders, normal_folders, samples, skipped)
        for p in sorted(q for q in root.iterdir() if q.is_file()):
            skipped.append(SkippedFile(str(p), "not inside a split folder"))
    else:
        _read_classes(root, None, defect_folders, normal_folders, samples, skipped)
    if not samples:
        raise UserError(f"{root}: no images found in class folders {defect_folders + normal_folders}")
    return samples, skipped
