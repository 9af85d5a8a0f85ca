"""YOLO and class-folder sources: layouts, labels, and every malformed input named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_image
from core.errors import UserError
from data.folder import read_folder
from data.yolo import label_path_for, read_yolo


def _yolo(tmp_path: Path, labels: dict[str, str | None], yaml_text: str | None = None, split: str = "train") -> Path:
    """images/<split>/<name>.png with labels/<split>/<name>.txt (None: no label file)."""
    for i, (name, text) in enumerate(labels.items()):
        write_image(tmp_path / "images" / split / f"{name}.png", seed=i)
        if text is not None:
            lp = tmp_path / "labels" / split / f"{name}.txt"
            lp.parent.mkdir(parents=True, exist_ok=True)
            lp.write_text(text)
    write_image(tmp_path / "images" / "val" / "v.png", seed=99)  # a normal image without a label file
    (tmp_path / "data.yaml").write_text(yaml_text or "path: .\ntrain: images/train\nval: images/val\nnames: [gap, bubble]\n")
    return tmp_path / "data.yaml"


def test_label_path_replaces_last_images_folder() -> None:
    assert label_path_for(Path("/d/images/x/images/a.jpg")) == Path("/d/images/x/labels/a.txt")


def test_yolo_image_level_labels(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n", "b": "", "c": None, "d": "1 0.2 0.2 0.1 0.1\n1 0.3 0.3 0.1 0.1\n"})
    ds = read_yolo(y, None, "normal")
    labels = {Path(s.path).stem: s.label for s in ds.samples if s.split == "train"}
    assert labels == {"a": 1, "b": 0, "c": 0, "d": 1}
    assert [(Path(s.path).stem, s.split, s.label) for s in ds.samples if s.split != "train"] == [("v", "val", 0)]
    assert ds.counts["train"] == {"defect": 2, "normal_empty": 1, "normal_missing": 1, "normal_other_classes": 0}
    assert ds.names == ["gap", "bubble"]


def test_yolo_defect_classes_by_name_and_id(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n", "d": "1 0.2 0.2 0.1 0.1\n"})
    by_name = {Path(s.path).stem: s.label for s in read_yolo(y, ["bubble"], "normal").samples}
    by_id = {Path(s.path).stem: s.label for s in read_yolo(y, [0], "normal").samples}
    assert by_name == {"a": 0, "d": 1, "v": 0} and by_id == {"a": 1, "d": 0, "v": 0}
    with pytest.raises(UserError, match="no class named 'crack'"):
        read_yolo(y, ["crack"], "normal")


def test_yolo_names_as_dict_and_nc(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "2 0.5 0.5 0.1 0.1\n"}, "path: .\ntrain: images/train\nval: images/val\nnames: {0: a, 1: b, 2: c}\n")
    assert read_yolo(y, None, "normal").names == ["a", "b", "c"]
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnc: 3\n")
    assert read_yolo(y, None, "normal").names == ["class0", "class1", "class2"]


def test_yolo_without_names_or_nc(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": ""}, "path: .\ntrain: images/train\nval: images/val\n")
    with pytest.raises(UserError, match="neither 'names' nor 'nc'"):
        read_yolo(y, None, "normal")


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 0.1", "4 columns; expected 5"),
        ("0 0.5 abc 0.1 0.1", "'abc' is not a number"),
        ("5 0.5 0.5 0.1 0.1", "class id 5 >= nc (2)"),
        ("0 0.5 1.2 0.1 0.1", "coordinates must be normalised to [0, 1]"),
        ("0.5 0.5 0.5 0.1 0.1", "class id '0.5' must be a non-negative integer"),
    ],
)
def test_yolo_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    y = _yolo(tmp_path, {"good": "0 0.5 0.5 0.1 0.1\n", "bad": f"1 0.1 0.1 0.1 0.1\n{line}\n"})
    with pytest.raises(UserError) as err:
        read_yolo(y, None, "normal")
    text = str(err.value)
    assert f"bad.txt:2: {message}" in text


def test_yolo_all_malformed_lines_listed_at_once(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "0 0.5\n", "b": "0 x 0.5 0.5 0.5\n"})
    with pytest.raises(UserError) as err:
        read_yolo(y, None, "normal")
    assert "2 malformed label line(s)" in str(err.value)
    assert "a.txt:1" in str(err.value) and "b.txt:1" in str(err.value)


def test_yolo_polygon_lines_are_accepted(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "0 0.1 0.1 0.2 0.1 0.2 0.2\n"})
    assert read_yolo(y, None, "normal").samples[0].label == 1


def test_yolo_missing_label_error(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": "", "c": None})
    with pytest.raises(UserError, match=r"(?s)2 image\(s\) have no label file.*c\.png.*v\.png"):
        read_yolo(y, None, "error")


def test_yolo_txt_list_and_outside_paths(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _yolo(root, {"a": "0 0.5 0.5 0.1 0.1\n", "b": ""})
    (root / "train.txt").write_text("images/train/a.png\n./images/train/b.png\n")
    (root / "data.yaml").write_text("path: .\ntrain: train.txt\nval: images/val\nnames: [gap]\n")
    assert sorted(Path(s.path).stem for s in read_yolo(root / "data.yaml", None, "normal").samples) == ["a", "b", "v"]
    write_image(tmp_path / "elsewhere.png")
    (root / "train.txt").write_text("images/train/a.png\n../elsewhere.png\n")
    with pytest.raises(UserError, match=r"(?s)1 image path\(s\) .*outside the dataset root.*train\.txt:2: \.\./elsewhere\.png"):
        read_yolo(root / "data.yaml", None, "normal")


def test_yolo_same_images_in_two_splits_is_refused(tmp_path: Path) -> None:
    y = _yolo(tmp_path, {"a": ""}, "path: .\ntrain: images/train\nval: images/train\nnames: [gap]\n")
    with pytest.raises(UserError, match=r"(?s)1 image\(s\) belong to more than one split.*a\.png \(in train, val\)"):
        read_yolo(y, None, "normal")


def test_roboflow_layout_with_and_without_yaml(tmp_path: Path) -> None:
    for split, sub in (("train", "train"), ("valid", "valid"), ("test", "test")):
        for i, text in enumerate(["0 0.5 0.5 0.2 0.2\n", ""]):
            write_image(tmp_path / sub / "images" / f"{split}{i}.jpg", seed=i, fmt="JPEG")
            (tmp_path / sub / "labels").mkdir(parents=True, exist_ok=True)
            (tmp_path / sub / "labels" / f"{split}{i}.txt").write_text(text)
    # Roboflow's data.yaml sits in the root yet says ../train/images.
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\nnc: 1\nnames: ['defect']\n")
    ds = read_yolo(tmp_path, None, "normal")
    assert {(s.split, s.label) for s in ds.samples} == {(sp, lab) for sp in ("train", "val", "test") for lab in (0, 1)}
    (tmp_path / "data.yaml").unlink()
    ds = read_yolo(tmp_path, None, "normal")
    assert len(ds.samples) == 6 and {s.split for s in ds.samples} == {"train", "val", "test"}


def test_yolo_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_yolo(tmp_path / "nope", None, "normal")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(UserError, match="images/train' .*does not exist"):
        read_yolo(tmp_path / "data.yaml", None, "normal")


def test_folder_flat_and_split_layouts(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "flat" / "Defect" / f"d{i}.png", seed=i)
        write_image(tmp_path / "flat" / "normal" / f"n{i}.png", seed=10 + i)
    (tmp_path / "flat" / "normal" / "notes.txt").write_text("x")
    samples, skipped = read_folder(tmp_path / "flat", ["defect"], ["normal"])
    assert sorted((Path(s.path).stem, s.label, s.split) for s in samples)[:2] == [("d0", 1, None), ("d1", 1, None)]
    assert [Path(s.path).name for s in skipped] == ["notes.txt"]
    for sp in ("train", "valid", "test"):
        write_image(tmp_path / "split" / sp / "ok" / "a.png")
        write_image(tmp_path / "split" / sp / "ng" / "b.png", seed=1)
    samples, _ = read_folder(tmp_path / "split", ["ng"], ["ok"])
    assert {(s.split, s.label) for s in samples} == {(sp, lab) for sp in ("train", "val", "test") for lab in (0, 1)}


def test_folder_unknown_class_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "defect" / "a.png")
    write_image(tmp_path / "scratch" / "b.png")
    with pytest.raises(UserError, match=r"\['scratch'\] are neither defect"):
        read_folder(tmp_path, ["defect"], ["normal"])
    with pytest.raises(UserError, match="does not exist"):
        read_folder(tmp_path / "none", ["defect"], ["normal"])
