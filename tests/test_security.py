"""Security: no file the pipeline reads can run code, and no file it writes needs unpickling.

YAML is read with ``yaml.safe_load`` only (a Python tag is refused, never executed); checkpoints
with ``torch.load(weights_only=True)`` (a planted pickle is refused, never executed); models are
safetensors + JSON; a YOLO split list naming files outside the dataset root is reported.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import write_image
from test_faults import reference_run, write_config

from distill.run import main

ROOT = Path(__file__).resolve().parents[1]


class _Evil:
    """Unpickling this runs ``touch <marker>``: proof of execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("where", ["config value", "config section", "override", "data.yaml"])
def test_python_yaml_tags_are_refused_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   where: str) -> None:
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system [\"touch '{marker}'\"]"
    cfg = tmp_path / "c.yaml"
    base = f"run: {{name: t, output_dir: '{tmp_path / 'runs'}'}}\n"
    argv = [str(cfg), "--stages", "data"]
    if where == "config value":
        cfg.write_text(base + f"teacher:\n  epochs: {tag}\n")
        expected = ["c.yaml: line 3, column 11", "tags such as !!python/object are refused"]
    elif where == "config section":
        cfg.write_text(base + f"student: !!python/object/new:os.system [\"touch '{marker}'\"]\n")
        expected = ["c.yaml: line 2", "tags such as !!python/object are refused"]
    elif where == "override":
        cfg.write_text(base)
        argv.append(f"teacher.epochs={tag}")
        expected = ["'teacher.epochs' (command-line override) must be an integer"]
    else:
        ds = tmp_path / "ds"
        write_image(ds / "images" / "train" / "a.png")
        (ds / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames: {tag}\n")
        cfg.write_text(base + f"data:\n  source: yolo\n  path: '{ds / 'data.yaml'}'\n")
        expected = ["data.yaml", "python/object/apply:os.system"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    for phrase in expected:
        assert phrase in err, f"{phrase!r} not in {err}"
    assert not marker.exists(), "the YAML tag was executed"


# ----------------------------------------------------------------------------- checkpoints and model files
@pytest.fixture
def data_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A tiny run whose data stage is finished (config, run directory)."""
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs", threads=None, num_train=16)
    assert main([str(cfg), "--stages", "data"]) == 0
    capsys.readouterr()
    return cfg, tmp_path / "runs" / "tiny"


@pytest.mark.parametrize("kind", ["plain pickle", "torch.save zip"])
def test_planted_pickle_checkpoint_is_never_executed(data_done: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], kind: str) -> None:
    cfg, run_dir = data_done
    marker = tmp_path / "pwned"
    ckpt = run_dir / "teacher" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    payload = {"model": _Evil(marker), "epoch": 1}
    if kind == "plain pickle":
        ckpt.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ckpt)  # the zip format torch itself writes, with a malicious data.pkl inside
    assert not marker.exists()
    code, out, err = _run([str(cfg), "--stages", "data,teacher"], capsys)
    assert not marker.exists(), "the planted checkpoint was unpickled and ran code"
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert f"checkpoint '{ckpt}' cannot be loaded safely" in err and "--force" in err, err
    assert "[teacher] epoch" not in out  # refused before training on top of it


def test_model_file_swapped_for_a_pickle_is_never_executed(data_done: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run_dir = data_done
    assert main([str(cfg), "--stages", "data,teacher", "teacher.epochs=1"]) == 0
    marker = tmp_path / "pwned"
    model = run_dir / "teacher" / "model.safetensors"
    model.write_bytes(pickle.dumps({"head.weight": _Evil(marker)}))
    capsys.readouterr()
    code, _, err = _run([str(cfg), "--stages", "data,teacher,student", "teacher.epochs=1"], capsys)
    assert not marker.exists(), "a model file was unpickled"
    assert code == 2 and "Traceback" not in err
    assert f"'{model}' cannot be read as safetensors" in err, err


def test_pickled_teacher_weights_file_is_never_executed(data_done: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """teacher.weights accepts .pth/.bin files (read with weights_only=True): a malicious one must not run."""
    cfg, _ = data_done
    marker = tmp_path / "pwned"
    weights = tmp_path / "vit from a colleague.pth"
    torch.save({"state_dict": _Evil(marker)}, weights)
    code, _, err = _run([str(cfg), "--stages", "data,teacher", f"teacher.weights={weights}"], capsys)
    assert not marker.exists(), "the weights file was unpickled and ran code"
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: teacher.weights: '{weights}' cannot be loaded safely"), err


def _project_sources() -> list[Path]:
    skip = {"tests", "runs", "build", "dist"}
    return [p for p in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part in skip or "venv" in part for part in p.relative_to(ROOT).parts)]


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """Every call with its dotted callee name (``torch.load``, ``yaml.safe_load``, ...)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            out.append((".".join(reversed(parts)), node))
    return out


def unsafe_loads(text: str, where: str) -> tuple[list[str], int, int]:
    """Loads in Python source that could run code, and the counts of torch.load and safe YAML calls seen."""
    tree = ast.parse(text)
    problems, torch_loads, safe_yaml = [], 0, 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml") and any(
                a.name in ("load", "unsafe_load", "full_load", "load_all") for a in node.names):
            problems.append(f"{where}:{node.lineno}: 'from {node.module} import' of a loader hides its calls")
    for name, call in _calls(tree):
        at = f"{where}:{call.lineno}"
        kwargs = {k.arg: k.value for k in call.keywords}
        if name == "torch.load":
            torch_loads += 1
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                      "yaml.full_load_all"):
            problems.append(f"{at}: {name}")
        elif name in ("yaml.safe_load", "yaml.safe_load_all"):
            safe_yaml += 1
        elif name.startswith("yaml.") and "Loader" in kwargs:
            loader = ast.unparse(kwargs["Loader"]).split(".")[-1]
            if loader in ("Loader", "UnsafeLoader", "FullLoader"):
                problems.append(f"{at}: {name}(Loader={loader})")
        elif name in ("np.load", "numpy.load"):
            flag = kwargs.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{at}: np.load with allow_pickle")
    return problems, torch_loads, safe_yaml


def test_the_source_check_catches_unsafe_loads() -> None:
    bad = ("import torch, yaml, numpy as np\nfrom yaml import load\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "yaml.load(t, Loader=yaml.Loader)\nyaml.unsafe_load(t)\nyaml.compose(t, Loader=yaml.UnsafeLoader)\n"
           "np.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\nyaml.safe_load(t)\n")
    problems, torch_loads, safe_yaml = unsafe_loads(bad, "x.py")
    assert [p.split(": ", 1)[0] for p in problems] == [f"x.py:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    assert torch_loads == 3 and safe_yaml == 1


def test_source_loads_only_safely() -> None:
    """Every torch.load has weights_only=True; YAML only through safe loaders; no pickle-enabled numpy."""
    sources = _project_sources()
    assert ROOT / "training" / "checkpoint.py" in sources and ROOT / "distill" / "config.py" in sources
    problems, torch_loads, safe_yaml = [], 0, 0
    for path in sources:
        found, t, y = unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        problems, torch_loads, safe_yaml = problems + found, torch_loads + t, safe_yaml + y
    assert torch_loads >= 1 and safe_yaml >= 2, "the scan found nothing: it is not looking at the project"
    assert not problems, "\n".join(problems)


def _is_pickle(data: bytes) -> bool:
    """A raw pickle (protocol 2+) or torch's zip format, which holds one (data.pkl)."""
    return (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5) or (data[:2] == b"PK" and b"data.pkl" in data)


@pytest.mark.slow
def test_a_run_writes_only_safetensors_and_json_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    run_dir = reference_run(tmp_path_factory)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    allowed = {".safetensors", ".json", ".csv", ".yaml", ".onnx", ".ckpt"}
    odd = [p for p in files if p.suffix not in allowed and not p.name.startswith("events.out.tfevents.")]
    assert not odd, f"unexpected files in the run: {odd}"
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".npy", ".npz")]
    for stage in ("teacher", "student", "student_pruned"):
        assert (run_dir / stage / "model.safetensors").is_file() and (run_dir / stage / "meta.json").is_file()
    # Pickled bytes only in the resume checkpoints, and those hold plain data (weights_only loads them).
    pickled = [p for p in files if _is_pickle(p.read_bytes())]
    assert pickled and all(p.name == "last.ckpt" for p in pickled), pickled
    for p in pickled:
        state = torch.load(p, map_location="cpu", weights_only=True)
        assert isinstance(state["model"], dict) and isinstance(state["epoch"], int)
    for meta in run_dir.rglob("meta.json"):
        json.loads(meta.read_text())


# ----------------------------------------------------------------------------- paths outside the dataset
@pytest.mark.parametrize("line", ["../outside/secret.png", "ABSOLUTE", "images/../../outside/secret.png",
                                  "images/train/link.png"])
def test_split_list_naming_a_file_outside_the_root_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               line: str) -> None:
    root = tmp_path / "ds"
    for i, split in enumerate(("train", "train", "val", "val", "test", "test")):
        write_image(root / "images" / split / f"{split}{i}.png", seed=i)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / f"{split}{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n" if i % 2 else "")
    secret = write_image(tmp_path / "outside" / "secret.png", seed=99)
    (root / "images" / "train" / "link.png").symlink_to(secret)  # a link inside the root to a file outside it
    line = str(secret) if line == "ABSOLUTE" else line
    (root / "train.txt").write_text(f"images/train/train0.png\n{line}\nimages/train/train1.png\n")
    (root / "data.yaml").write_text("path: .\ntrain: train.txt\nval: images/val\ntest: images/test\nnames: [gap]\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: t, output_dir: '{tmp_path / 'runs'}'}}\n"
                   f"data:\n  source: yolo\n  path: '{root / 'data.yaml'}'\n")
    code, _, err = _run([str(cfg), "--stages", "data"], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "1 image path(s) in a split list lie outside the dataset root" in err, err
    assert f"train.txt:2: {line} (resolves to {secret})" in err, err
    assert not (tmp_path / "runs" / "t" / "data" / "manifest.csv").exists()
