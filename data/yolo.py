"""An Ultralytics-format detection dataset read as image-level labels.

An image is a *defect* when its label file holds a box (or polygon) of a class in
``data.defect_classes`` (default: every class); an empty label file means *normal*, and so does a
missing one unless ``data.missing_label: error``. Layouts understood:

* ``data.yaml`` with ``path``, ``train``, ``val``, optional ``test``; ``names`` as a list or a
  dict, or ``nc``; each split a folder, a ``.txt`` list of image paths, or a list of those.
  The label of ``.../images/x.jpg`` is ``.../labels/x.txt`` (the last ``/images/`` replaced).
* The Roboflow export (``train/images``, ``train/labels``, ``valid/...``, ``test/...``), with or
  without its ``data.yaml`` (whose ``../train/images`` entries are resolved as Ultralytics does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from core.errors import UserError
from core.files import read_yaml_mapping
from data.manifest import UNLABELED, Sample, SkippedFile
from data.pool import POOL_ORIGIN

__all__ = ["IMAGE_EXTENSIONS", "YoloBox", "YoloDataset", "read_yolo", "label_path_for", "parse_label_file",
           "parse_label_objects"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_SPLIT_KEYS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",),
               UNLABELED: (UNLABELED,)}
_MAX_LISTED = 20

#: One object of a label file: class id, then centre x, centre y, width, height (normalised to [0, 1]).
YoloBox = tuple[int, float, float, float, float]


@dataclass
class YoloDataset:
    """What was read: samples with their source split, class names, and the files not used.

    ``boxes`` maps a defect image's path to its objects of the classes in ``data.defect_classes``
    (what labels its tiles with ``data.tiles``); normal images have no entry.
    """

    root: Path
    names: list[str]
    samples: list[Sample]
    skipped: list[SkippedFile] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    boxes: dict[str, list[YoloBox]] = field(default_factory=dict)


def label_path_for(image: Path) -> Path:
    """``a/images/b/c.jpg`` -> ``a/labels/b/c.txt`` (the *last* ``/images/``), as Ultralytics does."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _list_error(title: str, lines: list[str], fix: str) -> UserError:
    shown = lines[:_MAX_LISTED]
    more = f"\n  ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return UserError(f"{title}:\n  " + "\n  ".join(shown) + more + f"\n{fix}")


def parse_label_file(path: Path, nc: int | None) -> tuple[list[int], list[str]]:
    """Class ids of every object in a YOLO label file, and the problems found (``file:line: why``)."""
    objects, problems = parse_label_objects(path, nc)
    return [o[0] for o in objects], problems


def parse_label_objects(path: Path, nc: int | None) -> tuple[list[YoloBox], list[str]]:
    """Every object of a YOLO label file as ``(class, cx, cy, w, h)`` (normalised), and the problems
    found (``file:line: why``).

    A line is ``cls cx cy w h`` (a box), or ``cls x1 y1 x2 y2 x3 y3 ...`` (a polygon or an oriented
    box, kept as the box around its points); coordinates are normalised, so anything outside
    [0, 1.01] is an error (Ultralytics tolerates small overshoot from rounding).
    """
    objects: list[YoloBox] = []
    problems: list[str] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [], [f"{path}: not a text file"]
    for number, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols:
            continue
        where = f"{path}:{number}"
        if len(cols) != 5 and (len(cols) < 7 or len(cols) % 2 == 0):
            problems.append(
                f"{where}: {len(cols)} columns; expected 5 (class cx cy w h) or a polygon "
                f"(class followed by 3 or more x y pairs)"
            )
            continue
        try:
            values = [float(c) for c in cols]
        except ValueError:
            bad = next(c for c in cols if not _is_number(c))
            problems.append(f"{where}: '{bad}' is not a number")
            continue
        cls = values[0]
        if not cls.is_integer() or cls < 0:
            problems.append(f"{where}: class id '{cols[0]}' must be a non-negative integer")
            continue
        if nc is not None and cls >= nc:
            problems.append(f"{where}: class id {int(cls)} >= nc ({nc}); data.yaml names {nc} classes (0..{nc - 1})")
            continue
        coords = values[1:]
        if any(not math.isfinite(v) or v < 0.0 or v > 1.01 for v in coords):
            problems.append(f"{where}: coordinates must be normalised to [0, 1], got {' '.join(cols[1:])}")
            continue
        if len(coords) == 4:
            objects.append((int(cls), *coords))  # type: ignore[arg-type]
        else:
            xs, ys = coords[0::2], coords[1::2]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            objects.append((int(cls), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return objects, problems


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _names_from(doc: dict[str, Any], yaml_path: Path) -> list[str]:
    names = doc.get("names")
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise UserError(f"{yaml_path}: 'names' keys must be class ids (0, 1, ...), got {list(names)}") from None
        if ids != list(range(len(ids))):
            raise UserError(f"{yaml_path}: 'names' must number classes 0..{len(ids) - 1} without gaps, got {ids}")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if names is not None:
        raise UserError(f"{yaml_path}: 'names' must be a list or a mapping of id to name, got {type(names).__name__}")
    nc = doc.get("nc")
    if isinstance(nc, int) and nc > 0:
        return [f"class{i}" for i in range(nc)]
    raise UserError(
        f"{yaml_path}: neither 'names' nor 'nc' is given; add e.g. 'names: [defect]' "
        "(or 'nc: 1') so class ids in the label files can be checked"
    )


def _find_yaml(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (path / name).is_file():
            return path / name
    return None


def _resolve_entry(root: Path, entry: str) -> Path:
    candidate = Path(entry)
    if candidate.is_absolute():
        return candidate
    resolved = root / candidate
    # Roboflow writes '../train/images' beside a data.yaml that sits in the dataset root.
    if not resolved.exists() and entry.startswith("../"):
        alt = root / entry[3:]
        if alt.exists():
            return alt
    return resolved


def _images_in(entry: Path, root: Path, yaml_path: Path | None, outside: list[str]) -> tuple[list[Path], list[SkippedFile]]:
    """Image files named by one split entry: a folder (recursive) or a .txt list."""
    if entry.is_dir():
        images, skipped = [], []
        for p in sorted(entry.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p)
            elif p.suffix.lower() != ".txt":
                skipped.append(SkippedFile(str(p), f"not an image extension ({p.suffix or 'none'})"))
        return images, skipped
    if entry.is_file() and entry.suffix == ".txt":
        images = []
        base = root.resolve()
        for number, line in enumerate(entry.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            p = Path(line)
            p = p if p.is_absolute() else (root / p)
            try:
                p.resolve().relative_to(base)
            except ValueError:
                outside.append(f"{entry}:{number}: {line} (resolves to {p.resolve()})")
                continue
            images.append(p)
        return images, []
    src = f" (named in {yaml_path})" if yaml_path else ""
    raise UserError(f"split folder or list '{entry}'{src} does not exist; check the path and data.yaml's 'path'")


def read_yolo(path: str | Path, defect_classes: list[int | str] | None, missing_label: str) -> YoloDataset:
    """Read a YOLO dataset (a data.yaml, or its folder, or a Roboflow export folder)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"dataset '{given}' does not exist (data.path); point it at a data.yaml or its folder")
    yaml_path = _find_yaml(given)
    entries: dict[str, list[str]] = {}
    if yaml_path is not None:
        doc = read_yaml_mapping(yaml_path, "train, val and names")
        names = _names_from(doc, yaml_path)
        root = Path(doc["path"]) if doc.get("path") else yaml_path.parent
        if not root.is_absolute():
            root = (yaml_path.parent / root)
        for split, keys in _SPLIT_KEYS.items():
            for key in keys:
                value = doc.get(key)
                if value:
                    entries[split] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
                    break
        if "train" not in entries:
            raise UserError(f"{yaml_path}: no 'train' split given")
    else:
        # A Roboflow export without its data.yaml: split folders holding images/ and labels/.
        root, names = given, []
        for split, keys in _SPLIT_KEYS.items():
            for key in keys:
                if (given / key / "images").is_dir():
                    entries[split] = [f"{key}/images"]
                    break
        if not entries:
            raise UserError(
                f"'{given}' holds no data.yaml and no train/images folder; give data.path as a YOLO "
                "data.yaml or a folder in the Ultralytics or Roboflow layout"
            )
    nc = len(names) if names else None
    defect_ids = _defect_ids(defect_classes, names)

    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    problems: list[str] = []
    missing: list[str] = []
    outside: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    boxes: dict[str, list[YoloBox]] = {}
    for split, split_entries in entries.items():
        c = counts.setdefault(split, {"defect": 0, "normal_empty": 0, "normal_missing": 0, "normal_other_classes": 0})
        for entry in split_entries:
            images, skip = _images_in(_resolve_entry(root, entry), root, yaml_path, outside)
            skipped.extend(skip)
            for image in images:
                if split == UNLABELED:  # a pool: no label files, no label (data/pool.py)
                    samples.append(Sample(str(image), -1, image.stem, UNLABELED, f"{POOL_ORIGIN} (data.yaml '{split}')"))
                    continue
                label_file = label_path_for(image)
                if not label_file.is_file():
                    missing.append(str(image))
                    c["normal_missing"] += 1
                    samples.append(Sample(str(image), 0, image.stem, split, "no label file"))
                    continue
                objects, bad = parse_label_objects(label_file, nc)
                problems.extend(bad)
                classes = [o[0] for o in objects]
                hits = sorted({k for k in classes if defect_ids is None or k in defect_ids})
                if hits:
                    boxes[str(image)] = [o for o in objects if o[0] in hits]
                    c["defect"] += 1
                    shown = ", ".join(names[k] if names else str(k) for k in hits)
                    samples.append(Sample(str(image), 1, image.stem, split, f"boxes: {shown}"))
                elif classes:
                    c["normal_other_classes"] += 1
                    samples.append(Sample(str(image), 0, image.stem, split, "boxes of non-defect classes only"))
                else:
                    c["normal_empty"] += 1
                    samples.append(Sample(str(image), 0, image.stem, split, "empty label file"))
    if UNLABELED in counts:
        counts[UNLABELED] = {"pool": sum(s.split == UNLABELED for s in samples)}
    problems, outside, missing = (list(dict.fromkeys(x)) for x in (problems, outside, missing))
    if problems:
        raise _list_error(
            f"{len(problems)} malformed label line(s) in the YOLO dataset at {root}",
            problems,
            "Fix or remove these lines (YOLO lines are 'class cx cy w h', normalised to [0, 1]).",
        )
    if outside:
        raise _list_error(
            f"{len(outside)} image path(s) in a split list lie outside the dataset root {root.resolve()}",
            outside,
            "Move the images under the dataset root, or set data.yaml's 'path' to a folder that holds them.",
        )
    if missing and missing_label == "error":
        raise _list_error(
            f"{len(missing)} image(s) have no label file (data.missing_label: error)",
            missing,
            "Add empty label files for normal images, or set data.missing_label=normal.",
        )
    _refuse_shared_images(samples)
    return YoloDataset(root=root, names=names, samples=samples, skipped=skipped, counts=counts, boxes=boxes)


def _refuse_shared_images(samples: list[Sample]) -> None:
    """The same file in two splits (e.g. ``val: images/train``) makes every held-out number a lie."""
    splits: dict[str, set[str]] = {}
    for s in samples:
        splits.setdefault(str(Path(s.path).resolve()), set()).add(s.split or "")
    shared = [f"{p} (in {', '.join(sorted(sp))})" for p, sp in splits.items() if len(sp) > 1]
    if shared:
        raise _list_error(
            f"{len(shared)} image(s) belong to more than one split",
            shared,
            "Give train, val and test disjoint folders or lists (a held-out split must not share images); "
            "to let the pipeline split one folder, list it under 'train' only.",
        )


def _defect_ids(defect_classes: list[int | str] | None, names: list[str]) -> set[int] | None:
    if defect_classes is None:
        return None
    ids: set[int] = set()
    for item in defect_classes:
        if isinstance(item, int):
            if names and not 0 <= item < len(names):
                raise UserError(f"data.defect_classes: class id {item} is not in data.yaml's names (0..{len(names) - 1})")
            ids.add(item)
        elif item in names:
            ids.add(names.index(item))
        else:
            raise UserError(f"data.defect_classes: no class named '{item}'; data.yaml's names are {names}")
    return ids

