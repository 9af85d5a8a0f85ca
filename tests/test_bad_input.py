"""Bad input through the command line: every user mistake ends with exit status 2 and one message
naming the file, line or key, without a traceback (unless ``--debug``); odd but valid inputs load.

Each row runs ``distill.run.main([...])`` in-process (``--stages data`` where the mistake is in
the data); one subprocess test checks what a user's terminal really shows.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_image

from distill.run import main

ROOT = Path(__file__).resolve().parents[1]

#: A synthetic run small enough to reach the teacher stage in a second or two.
TINY = """\
run: {{name: t, output_dir: '{out}'}}
data:
  source: synthetic
  num_workers: 0
  synthetic: {{image_size: 32, num_train: 8, num_val: 4, num_test: 4}}
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  epochs: 0
student: {{arch: mobilenetv3_small_100, pretrained: false, img_size: 32, epochs: 0}}
"""


def _config(tmp_path: Path, data: str = "", extra: str = "", name: str = "c.yaml") -> Path:
    """A config whose run directory lies in tmp_path; ``data`` replaces the data section."""
    out = tmp_path / "runs"
    text = f"run: {{name: t, output_dir: '{out}'}}\n" + (f"data:\n{data}" if data else "") + extra
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "runs"))
    return path


def _folder(root: Path, n: int = 8, seed: int = 0) -> Path:
    """root/normal and root/defect with n distinct images each (enough for a 50/25/25 split)."""
    for i in range(n):
        write_image(root / "normal" / f"n{i:02d}.png", seed=seed + i)
        write_image(root / "defect" / f"d{i:02d}.png", seed=seed + 100 + i)
    return root


def _folder_config(tmp_path: Path, root: Path, extra: str = "") -> Path:
    return _config(tmp_path, f"  source: folder\n  path: '{root}'\n  split: [0.5, 0.25, 0.25]\n{extra}")


def _yolo(root: Path, bad_line: str | None = None, names: str = "names: [gap, bubble]\n") -> Path:
    """An Ultralytics dataset with train/val/test; ``bad_line`` goes into line 2 of train's bad.txt."""
    k = 0
    for split in ("train", "val", "test"):
        for i, text in enumerate(["0 0.5 0.5 0.2 0.2\n", "", "1 0.3 0.3 0.1 0.1\n", ""]):
            write_image(root / "images" / split / f"{split}{i}.png", seed=k)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{split}{i}.txt").write_text(text)
            k += 1
    if bad_line is not None:
        write_image(root / "images" / "train" / "bad.png", seed=k)
        (root / "labels" / "train" / "bad.txt").write_text(f"1 0.1 0.1 0.1 0.1\n{bad_line}\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\ntest: images/test\n{names}")
    return root / "data.yaml"


def _yolo_config(tmp_path: Path, yaml_path: Path) -> Path:
    return _config(tmp_path, f"  source: yolo\n  path: '{yaml_path}'\n")


def _corrupt_folder(tmp_path: Path) -> Path:
    """A good folder dataset plus a zero-byte, a truncated and a non-image file with image extensions."""
    root = _folder(tmp_path / "ds")
    (root / "normal" / "zero.png").write_bytes(b"")
    (root / "defect" / "words.jpg").write_text("this is not a picture")
    good = write_image(tmp_path / "whole.jpg", seed=7, size=64, fmt="JPEG").read_bytes()
    (root / "normal" / "half.jpg").write_bytes(good[: len(good) // 2])
    return root


# ----------------------------------------------------------------------------- the table of mistakes
# Each row: id, a builder (tmp_path -> argv), and the phrases the one error message must hold.
Row = tuple[str, Callable[[Path], list[str]], list[str]]

MISTAKES: list[Row] = [
    ("missing config file",
     lambda t: [str(t / "nope.yaml")],
     ["config file", "nope.yaml' not found"]),
    ("YAML syntax error",
     lambda t: [str(_config(t, extra="teacher:\n  epochs: [3\n"))],
     ["c.yaml: line 4, column 1: YAML syntax error"]),
    ("unknown key in the file",
     lambda t: [str(_config(t, extra="techer:\n  epochs: 3\n"))],
     ["unknown key 'techer.epochs'", "c.yaml line 3", "did you mean 'teacher.epochs'?"]),
    ("unknown key on the command line",
     lambda t: [str(_config(t)), "data.synthetic.num_trian=10"],
     ["unknown key 'data.synthetic.num_trian' (command-line override)", "did you mean 'data.synthetic.num_train'?"]),
    ("wrong type in the file",
     lambda t: [str(_config(t, extra="teacher:\n  lr: 0.001\n  epochs: ten\n"))],
     ["'teacher.epochs'", "c.yaml line 4", "must be an integer, got 'ten'"]),
    ("wrong type on the command line",
     lambda t: [str(_config(t)), "student.batch_size=large"],
     ["'student.batch_size' (command-line override)", "must be an integer", "'large'"]),
    ("negative epochs in the file",
     lambda t: [str(_config(t, extra="student:\n  epochs: -1\n"))],
     ["'student.epochs'", "c.yaml line 3", "must be >= 0, got -1"]),
    ("negative epochs on the command line",
     lambda t: [str(_config(t)), "prune.epochs=-2"],
     ["'prune.epochs' (command-line override)", "must be >= 0, got -2"]),
    ("unknown teacher architecture",
     lambda t: [str(_tiny(t)), "teacher.arch=vit_tiny_patch16_22", "--stages", "data,teacher"],
     ["unknown timm architecture 'vit_tiny_patch16_22' (teacher.arch)", "close matches: vit_tiny_patch16_224"]),
    ("unknown student architecture",
     lambda t: [str(_tiny(t)), "student.arch=mobilenetv3_smal_100", "--stages", "data,teacher,student"],
     ["unknown timm architecture 'mobilenetv3_smal_100' (student.arch)", "close matches:", "mobilenetv3_small_100"]),
    ("missing dataset folder",
     lambda t: [str(_config(t, f"  source: folder\n  path: '{t / 'no such folder'}'\n")), "--stages", "data"],
     ["dataset folder", "no such folder' does not exist (data.path)"]),
    ("missing YOLO dataset",
     lambda t: [str(_config(t, f"  source: yolo\n  path: '{t / 'gone' / 'data.yaml'}'\n")), "--stages", "data"],
     ["gone/data.yaml' does not exist (data.path)"]),
    ("data.yaml without names or nc",
     lambda t: [str(_yolo_config(t, _yolo(t / "ds", names=""))), "--stages", "data"],
     ["data.yaml: neither 'names' nor 'nc' is given"]),
    ("label line with 4 columns",
     lambda t: [str(_yolo_config(t, _yolo(t / "ds", "0 0.5 0.5 0.1"))), "--stages", "data"],
     ["1 malformed label line(s)", "bad.txt:2: 4 columns; expected 5"]),
    ("label line with text",
     lambda t: [str(_yolo_config(t, _yolo(t / "ds", "0 0.5 left 0.1 0.1"))), "--stages", "data"],
     ["bad.txt:2: 'left' is not a number"]),
    ("label class id >= nc",
     lambda t: [str(_yolo_config(t, _yolo(t / "ds", "2 0.5 0.5 0.1 0.1"))), "--stages", "data"],
     ["bad.txt:2: class id 2 >= nc (2)"]),
    ("label coordinates > 1.01",
     lambda t: [str(_yolo_config(t, _yolo(t / "ds", "0 0.5 0.5 1.02 0.1"))), "--stages", "data"],
     ["bad.txt:2: coordinates must be normalised to [0, 1]"]),
    ("zero-byte, truncated and non-image files",
     lambda t: [str(_folder_config(t, _corrupt_folder(t))), "--stages", "data"],
     ["3 unreadable image(s)", "zero.png: empty file (0 bytes)", "words.jpg: not an image", "half.jpg: truncated",
      "data.on_corrupt=skip"]),
    ("a split with one class",
     lambda t: [str(_folder_config(t, _one_class_test_split(t / "ds"))), "--stages", "data"],
     ["the 'test' split has only one class (normal: 2, defect: 0)", "data.split"]),
]


def _one_class_test_split(root: Path) -> Path:
    """root/{train,val,test}/<class>/: train and val have both classes, test only 2 normal images."""
    seed = 0
    for split, n_normal, n_defect in (("train", 4, 4), ("val", 2, 2), ("test", 2, 0)):
        for cls, n in (("normal", n_normal), ("defect", n_defect)):
            for i in range(n):
                write_image(root / split / cls / f"{split}_{cls}{i}.png", seed=seed)
                seed += 1
    return root


@pytest.mark.parametrize("build, phrases", [r[1:] for r in MISTAKES], ids=[r[0] for r in MISTAKES])
def test_mistake_exits_2_with_one_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 build: Callable[[Path], list[str]], phrases: list[str]) -> None:
    argv = build(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and [ln.startswith("error: ") for ln in err.splitlines()].count(True) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in:\n{err}"


def test_unknown_student_arch_is_reported_before_the_teacher_trains(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in student.arch must not cost a whole teacher run (hours on Colab) before it is reported."""
    cfg = _tiny(tmp_path)
    argv = [str(cfg), "student.arch=mobilenetv3_smal_100", "teacher.epochs=1", "--stages", "data,teacher,student"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "unknown timm architecture 'mobilenetv3_smal_100' (student.arch)" in captured.err
    assert "[teacher] epoch" not in captured.out, "the teacher trained before the student's arch was checked"


# ----------------------------------------------------------------------------- inputs that must be accepted
def _skip_corrupt(t: Path) -> list[str]:
    return [str(_folder_config(t, _corrupt_folder(t), "  on_corrupt: skip\n")), "--stages", "data"]


def _check_skipped(run_dir: Path) -> None:
    with (run_dir / "data" / "skipped.csv").open(newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert set(rows) == {"zero.png", "words.jpg", "half.jpg"}
    assert "empty file" in rows["zero.png"] and "not an image" in rows["words.jpg"] and "truncated" in rows["half.jpg"]
    manifest = (run_dir / "data" / "manifest.csv").read_text(encoding="utf-8")
    assert not any(name in manifest for name in rows)
    report = json.loads((run_dir / "data" / "report.json").read_text())
    assert report["skipped"] == 3 and report["total"] == 16


def _mixed_modes(t: Path) -> list[str]:
    root = t / "ds"
    modes = ["L", "RGBA", "P", "I;16", "LA", "RGB"]
    for i in range(8):
        write_image(root / "normal" / f"n{i}.png", seed=i, mode=modes[i % len(modes)])
        write_image(root / "defect" / f"d{i}.png", seed=100 + i, mode=modes[(i + 3) % len(modes)])
    write_image(root / "normal" / "cmyk.jpg", seed=50, mode="CMYK", fmt="JPEG")
    return [str(_folder_config(t, root)), "--stages", "data"]


def _check_mixed_modes(run_dir: Path) -> None:
    from PIL import Image

    manifest = list(csv.DictReader((run_dir / "data" / "manifest.csv").open(encoding="utf-8")))
    assert len(manifest) == 17
    assert {Image.open(r["path"]).mode for r in manifest} >= {"L", "RGBA", "P", "I;16", "LA", "RGB", "CMYK"}
    assert (run_dir / "data" / "skipped.csv").read_text().strip() == "path,reason"


def _unicode_paths(t: Path) -> list[str]:
    root = _folder(t / "données de test" / "ligne 1 — été ✓")
    cfg = _config(t / "mes configs", f"  source: folder\n  path: '{root}'\n  split: [0.5, 0.25, 0.25]\n",
                  name="réglage 1.yaml")
    return [str(cfg), "run.name=essai été 1", "--stages", "data"]


def _check_unicode(run_dir: Path) -> None:
    assert run_dir.name == "essai été 1"
    paths = [r["path"] for r in csv.DictReader((run_dir / "data" / "manifest.csv").open(encoding="utf-8"))]
    assert len(paths) == 16 and all("ligne 1 — été ✓" in p and Path(p).is_file() for p in paths)


def _coordinate_tolerance(t: Path) -> list[str]:
    # 1.005 is rounding overshoot (Ultralytics accepts up to 1.01): a defect box, not an error.
    return [str(_yolo_config(t, _yolo(t / "ds", "0 0.5 0.5 1.005 0.1"))), "--stages", "data"]


def _check_tolerance(run_dir: Path) -> None:
    rows = {Path(r["path"]).name: r for r in csv.DictReader((run_dir / "data" / "manifest.csv").open(encoding="utf-8"))}
    assert rows["bad.png"]["label"] == "1"


ACCEPTED = [
    ("corrupt files skipped with data.on_corrupt=skip", _skip_corrupt, _check_skipped, "t"),  # and the run goes on
    ("images of mixed modes", _mixed_modes, _check_mixed_modes, "t"),
    ("unicode and spaces in paths", _unicode_paths, _check_unicode, "essai été 1"),
    ("coordinates within the 1.01 tolerance", _coordinate_tolerance, _check_tolerance, "t"),
]


@pytest.mark.parametrize("build, check, name", [r[1:] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_valid_odd_input_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     build: Callable[[Path], list[str]], check: Callable[[Path], None],
                                     name: str) -> None:
    argv = build(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run_dir = next(d / name for d in tmp_path.rglob("runs") if (d / name).is_dir())
    check(run_dir)
    if build is _skip_corrupt:  # skipped files are said on the console too, not only in the csv
        assert "skipped 3 file(s)" in captured.out and "data/skipped.csv" in captured.out


# ----------------------------------------------------------------------------- what a terminal shows
def test_terminal_shows_no_traceback_unless_debug(tmp_path: Path) -> None:
    cfg = _folder_config(tmp_path, _corrupt_folder(tmp_path))

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distill.run", str(cfg), "--stages", "data", *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)

    plain = run()
    assert plain.returncode == 2
    assert plain.stderr.startswith("error: 3 unreadable image(s)") and "Traceback" not in plain.stderr
    debug = run("--debug")
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "UserError: 3 unreadable image(s)" in debug.stderr
