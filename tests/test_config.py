"""Config: typed sections, dotted overrides, and errors that name the key, file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import UserError
from core.schema import changed_keys
from distill.config import load_config, parse_overrides
from core.schema import to_dict

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run.name


def test_overrides_convert_types(tmp_path: Path) -> None:
    p = _write(tmp_path, "teacher:\n  epochs: 2\n")
    cfg = load_config(p, ["teacher.epochs=5", "teacher.lr=1e-3", "run.name=2024", "data.split=[0.6,0.2,0.2]",
                          "prune.target.macs=0.4", "teacher.img_size=null", "distill.baseline=true"])
    assert cfg.teacher.epochs == 5 and isinstance(cfg.teacher.epochs, int)
    assert cfg.teacher.lr == pytest.approx(1e-3)
    assert cfg.run.name == "2024"  # a string key stays a string
    assert cfg.data.split == (0.6, 0.2, 0.2)
    assert cfg.prune.target == {"macs": 0.4}
    assert cfg.teacher.img_size is None and cfg.distill.baseline is True


def test_path_overrides_stay_verbatim(tmp_path: Path) -> None:
    p = _write(tmp_path, "")
    cfg = load_config(p, ["data.path=/drive/line 1 #2/data.yaml", "teacher.weights=yes", "data.group_by=^(a: b)"])
    assert cfg.data.path == "/drive/line 1 #2/data.yaml"
    assert cfg.teacher.weights == "yes" and cfg.data.group_by == "^(a: b)"
    assert load_config(p, ["teacher.weights=null"]).teacher.weights is None


def test_yaml_float_without_dot_is_accepted(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as a string; a learning rate written that way must still work.
    cfg = load_config(_write(tmp_path, "student:\n  lr: 1e-3\n"))
    assert cfg.student.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("techer:\n  epochs: 3\n", [], "unknown key 'techer.epochs' (c.yaml line 2) — did you mean 'teacher.epochs'?"),
        ("teacher:\n  epoch: 3\n", [], "did you mean 'teacher.epochs'?"),
        ("teacher:\n  epochs: ten\n", [], "'teacher.epochs' (c.yaml line 2) must be an integer, got 'ten' (str)"),
        ("teacher:\n  epochs: -1\n", [], "'teacher.epochs' (c.yaml line 2) must be >= 0, got -1"),
        ("data:\n  source: yolov\n", [], "did you mean 'yolo'?"),
        ("data:\n  source: yolo\n", [], "'data.path'"),
        ("", ["teacher.epocs=3"], "unknown key 'teacher.epocs' (command-line override) — did you mean 'teacher.epochs'?"),
        ("", ["teacher.epochs"], "must look like section.key=value"),
        ("", ["distill.mixup=0.2", "distill.teacher_outputs=cached"], "needs distill.teacher_outputs=live"),
        ("", ["prune.target={flops: 0.5}"], "'prune.target'"),
        ("", ["data.label_fraction=0"], "'data.label_fraction' (command-line override) must be in (0, 1]"),
        ("", ["student.train_fraction=0.5"], "'student.train_fraction' (command-line override) was replaced by "
                                             "data.label_fraction"),
        ("student:\n  lr: 0.1\n  train_fraction: 0.5\n", [], "'student.train_fraction' (c.yaml line 3) was replaced"),
        ("data:\n  source: synthetic\n  unlabeled: pool/\n", [], "data.synthetic.num_unlabeled"),
        ("run: [1, 2]\n", [], "'run' (c.yaml line 1) must be a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, text), overrides)
    assert expected in str(err.value).replace(str(tmp_path) + "/", "")


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"line 3, column 1: YAML syntax error"):
        load_config(_write(tmp_path, "run:\n  name: [x\n"))


def test_python_tags_are_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"run: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(UserError, match="tags such as !!python/object are refused"):
        load_config(_write(tmp_path, text))
    assert not marker.exists()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file .* not found"):
        load_config(tmp_path / "nope.yaml")


def test_changed_keys(tmp_path: Path) -> None:
    a = load_config(_write(tmp_path, ""))
    b = load_config(_write(tmp_path, ""), ["teacher.epochs=99"])
    assert changed_keys(to_dict(a), to_dict(b)) == ["teacher.epochs"]
    assert changed_keys(to_dict(a.data), to_dict(b.data)) == []


def test_parse_overrides_nested() -> None:
    assert parse_overrides(["data.synthetic.num_train=10"]) == {"data": {"synthetic": {"num_train": 10}}}
