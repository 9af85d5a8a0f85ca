"""The command line: exit status 2 with one clear message, tracebacks only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def folder_config(tmp_path: Path) -> Path:
    for i in range(12):
        write_image(tmp_path / "ds" / "normal" / f"n{i}.png", seed=i)
        write_image(tmp_path / "ds" / "defect" / f"d{i}.png", seed=50 + i)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  name: t\n  output_dir: {tmp_path / 'runs'}\ndata:\n  source: folder\n  path: {tmp_path / 'ds'}\n"
                   "  split: [0.5, 0.25, 0.25]\n")
    return cfg


def test_data_stage_only(folder_config: Path, tmp_path: Path) -> None:
    res = _run(str(folder_config), "--stages", "data", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data" / "manifest.csv").is_file()
    assert "train" in res.stdout and "defect" in res.stdout
    assert not (run_dir / "teacher").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["teacher.epocs=2"], "did you mean 'teacher.epochs'?"),
        (["--stages", "data,techer"], "unknown stage(s) ['techer']"),
        (["data.path=/definitely/not/here"], "does not exist"),
    ],
)
def test_user_errors_exit_2_without_traceback(folder_config: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = _run(str(folder_config), *args, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ")


def test_debug_shows_traceback(folder_config: Path, tmp_path: Path) -> None:
    res = _run(str(folder_config), "teacher.epocs=2", "--debug", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    res = _run("nope.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "config file 'nope.yaml' not found" in res.stderr
