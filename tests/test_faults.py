"""Faults: a run killed with SIGKILL anywhere resumes and ends exactly like one never killed; a full
or unwritable disk while checkpointing gives a clear error and keeps the last checkpoint; a config
changed between a run and its resume is refused, naming the keys.

The kill test drives ``python -m distill.run`` as a subprocess, reads its output line by line and
sends SIGKILL when a marker line appears (the way a Colab runtime dies). The other tests call
``distill.run.main`` in-process. :func:`reference_run` (the never-killed run) is shared with
``test_security.py``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import distill.run
from distill.run import main

ROOT = Path(__file__).resolve().parents[1]
STAGES = "data,teacher,student,prune,export"
EPOCHS = {"teacher": 3, "student": 3, "prune": 2}

#: A quickstart-shaped run, shrunk to seconds: synthetic beads at 32 px, a one-block ViT teacher.
TINY = """\
run:
  name: {name}
  output_dir: '{output_dir}'
  seed: 0
  device: cpu
  threads: {threads}
data:
  source: synthetic
  num_workers: 0
  synthetic: {{image_size: 32, num_train: {num_train}, num_val: 24, num_test: 24}}
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  drop_path: 0.0
  layer_decay: null
  epochs: {teacher_epochs}
  batch_size: 16
student:
  arch: mobilenetv3_small_100
  pretrained: false
  img_size: 32
  epochs: {student_epochs}
  batch_size: 16
  ema: true
  ema_decay: 0.9
prune:
  target: {{macs: 0.6}}
  steps: 1
  epochs: {prune_epochs}
  batch_size: 16
export:
  int8: false
"""


def write_config(path: Path, output_dir: Path, *, name: str = "tiny", threads: int | None = 1,
                 num_train: int = 48) -> Path:
    """The tiny config at ``path``; ``threads=None`` leaves torch's threads alone (in-process runs)."""
    path.write_text(TINY.format(name=name, output_dir=output_dir, threads="null" if threads is None else threads,
                                num_train=num_train, teacher_epochs=EPOCHS["teacher"],
                                student_epochs=EPOCHS["student"], prune_epochs=EPOCHS["prune"]))
    return path


def run_pipeline(cfg: Path, *args: str, kill_at: str | None = None) -> tuple[int, list[str]]:
    """Run the CLI in a subprocess; SIGKILL it as soon as a line starting with ``kill_at`` appears.

    Returns the exit status (``-SIGKILL`` when killed) and every line it printed.
    """
    log = cfg.parent / "stderr.txt"
    with log.open("a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "distill.run", str(cfg), "--stages", STAGES, *args],
                                cwd=cfg.parent, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: list[str] = []
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line.rstrip("\n"))
                if kill_at is not None and line.startswith(kill_at):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            lines += proc.stdout.read().splitlines()  # type: ignore[union-attr]
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}:\n" + "\n".join(lines) + "\n" + log.read_text()[-3000:])
    return proc.returncode, lines


_REFERENCE: dict[str, Path] = {}


def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The never-killed tiny run (made once per session, shared with test_security.py)."""
    if "run_dir" not in _REFERENCE:
        base = tmp_path_factory.mktemp("never_killed")
        code, lines = run_pipeline(write_config(base / "tiny.yaml", base / "runs"))
        assert code == 0 and lines[-1].startswith("done in"), "\n".join(lines)
        _REFERENCE["run_dir"] = base / "runs" / "tiny"
    return _REFERENCE["run_dir"]


def _is_partial(path: Path) -> bool:
    return path.name.endswith(".tmp") or path.name.startswith((".export-", ".quantize-"))


def assert_files_intact(run_dir: Path, *, allow_partial: bool = False) -> None:
    """Every file in the run is whole: JSON/YAML/CSV parse, safetensors and checkpoints load, ONNX
    checks out; no temporary file or export folder is left (unless ``allow_partial``: right after a
    kill, the temporaries are what a rerun cleans up, but every file under its real name must be whole)."""
    import onnx
    from safetensors.torch import load_file

    partial = [p for p in run_dir.rglob("*") if _is_partial(p)]
    assert allow_partial or not partial, f"partial files left: {partial}"
    for path in run_dir.rglob("*"):
        if not path.is_file() or any(_is_partial(p) for p in (path, *path.parents)):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".yaml":
                assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)
            elif path.suffix == ".csv":
                rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
                assert rows and all(len(r) == len(rows[0]) for r in rows)
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".ckpt":
                assert isinstance(torch.load(path, map_location="cpu", weights_only=True)["epoch"], int)
            elif path.suffix == ".onnx":
                onnx.checker.check_model(onnx.load(str(path)))
        except Exception as exc:  # noqa: BLE001 - any failure to read back means the file is damaged
            raise AssertionError(f"{path} is damaged: {type(exc).__name__}: {exc}") from None


def outcome(run_dir: Path) -> dict:
    """What a run ended with: each model's test metrics, threshold and epochs, and the export check."""
    out = {}
    for name in ("teacher", "student", "student_pruned"):
        meta = json.loads((run_dir / name / "meta.json").read_text())
        out[name] = {k: meta[k] for k in ("metrics", "threshold", "best_epoch", "epochs_run")}
    out["export"] = json.loads((run_dir / "export" / "verify.json").read_text())
    return out


def _weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / name / "model.safetensors"))


# ----------------------------------------------------------------------------- SIGKILL and resume
#: Where the run is killed, in order; each rerun of the same command is killed at the next point.
KILL_POINTS = [
    "[teacher] epoch 1/3",          # teacher stage, after its first epoch's checkpoint
    "[student] epoch 1/3",          # distillation
    "[prune] round 1/1",            # right after pruning, before the recovery epochs
    "[prune round 1] epoch ",       # during the recovery distillation (epoch 1/2, or 2/2 if the last kill was late)
    "[export] ",                    # after the first ONNX file, before verify.json
]
#: A stage's directory -> where its resumable checkpoint lives and the name its epoch lines use.
TRAINED = {"teacher": ("teacher", "teacher"), "student": ("student", "student"),
           "student_pruned": ("student_pruned/round1", "prune round 1")}


def _state(run_dir: Path) -> dict:
    """Finished stages, the epoch of each unfinished stage's checkpoint, and the pruned start weights."""
    finished, epochs = [], {}
    for stage, (ckpt_dir, name) in TRAINED.items():
        if (run_dir / stage / "meta.json").is_file():
            finished.append(stage)
        elif (run_dir / ckpt_dir / "last.ckpt").is_file():
            epochs[name] = torch.load(run_dir / ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    start = run_dir / "student_pruned" / "round1" / "start.safetensors"
    return {"finished": finished, "epochs": epochs, "pruned_at": start.read_bytes() if start.is_file() else None}


def _assert_resumed(before: dict, lines: list[str], run_dir: Path) -> None:
    """The rerun skipped what was finished and went on from each checkpoint's epoch, redoing nothing."""
    for stage in before["finished"]:
        assert any(ln.startswith(f"[{stage}] finished earlier") for ln in lines), (stage, lines)
        assert not any(ln.startswith(f"[{TRAINED[stage][1]}] epoch") for ln in lines), f"{stage} was redone"
    for name, done in before["epochs"].items():
        total = EPOCHS[name.split()[0]]
        if done < total:
            assert f"[{name}] resuming at epoch {done + 1}/{total}" in "\n".join(lines), (name, done, lines)
        for k in range(1, done + 1):
            assert not any(ln.startswith(f"[{name}] epoch {k}/{total}") for ln in lines), f"{name} redid epoch {k}"
    if before["pruned_at"] is not None:  # the pruned structure and weights are reused, not pruned again
        assert (run_dir / "student_pruned" / "round1" / "start.safetensors").read_bytes() == before["pruned_at"]


def _plant_partial_files(run_dir: Path) -> list[Path]:
    """What a kill in the middle of a write leaves: hidden temporaries and a half-made export folder."""
    planted = [run_dir / "teacher" / ".last.ckpt.4242.tmp", run_dir / "student" / ".meta.json.4242.tmp",
               run_dir / "export" / ".export-k1ll3d"]
    planted[0].write_bytes(b"PK\x03\x04 half a zip")
    planted[1].write_text('{"stage": "stu')
    planted[2].mkdir(parents=True)
    (planted[2] / "student.onnx").write_bytes(b"\x08\x07")
    return planted


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_ends_as_if_never_killed(tmp_path: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs")
    run_dir = tmp_path / "runs" / "tiny"
    planted: list[Path] = []
    lines: list[str] = []
    for i, marker in enumerate([*KILL_POINTS, None]):
        before = _state(run_dir) if i else None
        if marker is None:  # before the last rerun: leftovers of a kill in the middle of a write
            planted = _plant_partial_files(run_dir)
        code, lines = run_pipeline(cfg, kill_at=marker)
        if before is not None:
            _assert_resumed(before, lines, run_dir)
        if marker is not None:
            assert code == -signal.SIGKILL, f"never reached {marker!r}:\n" + "\n".join(lines)
            assert_files_intact(run_dir, allow_partial=True)
    assert code == 0 and lines[-1].startswith("done in")
    removed = [int(ln.split()[1]) for ln in lines if ln.startswith("removed ") and "partial file(s)" in ln]
    assert removed and removed[0] >= len(planted), lines  # the planted ones, and any the export kill left
    assert not any(p.exists() for p in planted)
    assert_files_intact(run_dir)

    reference = reference_run(tmp_path_factory)
    assert outcome(run_dir) == outcome(reference)
    for name in ("teacher", "student", "student_pruned"):
        mine, theirs = _weights(run_dir, name), _weights(reference, name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name


# ----------------------------------------------------------------------------- disk full, unwritable disk
@pytest.fixture
def teacher_run(tmp_path: Path) -> tuple[Path, Path]:
    """A config for an in-process data+teacher run (16 training images) and its run directory."""
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs", threads=None, num_train=16)
    return cfg, tmp_path / "runs" / "tiny"


def _main(argv: list[str]) -> int:
    """``main`` as the command line would end: any exception escaping it would be a traceback."""
    try:
        return main(argv)
    except BaseException as exc:  # noqa: BLE001 - reported as a test failure, not a crash of the test
        pytest.fail(f"{type(exc).__name__} escaped main() (the user sees a traceback): {exc}")


def _fill_the_disk_after_epoch_1(monkeypatch: pytest.MonkeyPatch, how: str, stage_dir: Path, seen: dict) -> None:
    """Make the disk fill up during epoch 2's checkpointing (epoch 1's is written normally).

    ``oserror``: torch.save writes half a file, then raises OSError(ENOSPC) (a mocked failure);
    ``erofs``: the same with a read-only file system. ``dev_full``: the real thing — once epoch 1 is
    saved, the temporary name of the next checkpoint (``.last.ckpt.<pid>.tmp``, data/files.py) is a
    link to /dev/full, so the kernel answers ENOSPC to the writes, whoever makes them;
    ``metrics``: the same for the epoch's metrics.csv.
    """
    if how in ("oserror", "erofs"):
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            seen["calls"] = seen.get("calls", 0) + 1
            if seen["calls"] == 1:
                return real_save(obj, f, *args, **kwargs)
            seen["previous"] = (stage_dir / "last.ckpt").read_bytes()
            half = b"PK\x03\x04 half a checkpoint"
            f.write(half) if hasattr(f, "write") else Path(f).write_bytes(half)
            code = errno.ENOSPC if how == "oserror" else errno.EROFS
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(torch, "save", save)
        return
    name = "last.ckpt" if how == "dev_full" else "metrics.csv"
    real_say = distill.run._say

    def say(text: str) -> None:
        real_say(text)
        if text.startswith("[teacher] epoch 1/"):  # printed once epoch 1's checkpoint is in place
            seen["previous"] = (stage_dir / "last.ckpt").read_bytes()
            (stage_dir / f".{name}.{os.getpid()}.tmp").symlink_to("/dev/full")

    monkeypatch.setattr(distill.run, "_say", say)


@pytest.mark.parametrize("how, file, cause", [
    ("oserror", "last.ckpt", "No space left on device"),
    ("erofs", "last.ckpt", "Read-only file system"),
    ("dev_full", "last.ckpt", "No space left on device"),
    ("metrics", "metrics.csv", "No space left on device"),
])
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(
        teacher_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        how: str, file: str, cause: str) -> None:
    cfg, run_dir = teacher_run
    seen: dict = {}
    _fill_the_disk_after_epoch_1(monkeypatch, how, run_dir / "teacher", seen)
    code = _main([str(cfg), "--stages", "data,teacher"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert file in err and cause in err, err
    ckpt = run_dir / "teacher" / "last.ckpt"
    assert ckpt.read_bytes() == seen["previous"]  # epoch 1's checkpoint, untouched
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 1
    assert not (run_dir / "teacher" / "meta.json").exists()

    monkeypatch.undo()  # space freed: the same command resumes from epoch 2
    assert _main([str(cfg), "--stages", "data,teacher"]) == 0
    out = capsys.readouterr().out
    assert f"[teacher] resuming at epoch 2/{EPOCHS['teacher']}" in out and "[teacher] epoch 1/" not in out
    assert_files_intact(run_dir)


def test_disk_full_writing_the_final_model(teacher_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """safetensors reports a full disk with its own error type (SafetensorError: '... No space left on
    device (os error 28)'), not OSError; it must still end as a clear message, not a traceback."""
    import safetensors

    import training.modeling

    cfg, run_dir = teacher_run

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(training.modeling, "save_file", full)
    code = _main([str(cfg), "--stages", "data,teacher"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "model.safetensors" in err and "No space left on device" in err, err
    assert torch.load(run_dir / "teacher" / "last.ckpt", weights_only=True)["epoch"] == EPOCHS["teacher"]
    monkeypatch.undo()
    assert _main([str(cfg), "--stages", "data,teacher"]) == 0
    assert "[teacher] epoch" not in capsys.readouterr().out  # every epoch was kept; only the model is written
    assert_files_intact(run_dir)


def test_unwritable_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Tests run as root, which file permissions do not stop; nothing can be created under /proc.
    cfg = write_config(tmp_path / "tiny.yaml", Path("/proc/sealant-runs"), threads=None)
    assert _main([str(cfg), "--stages", "data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the run directory '/proc/sealant-runs/tiny'") and "Traceback" not in err
    assert "choose a writable run.output_dir" in err


# ----------------------------------------------------------------------------- config changed before a resume
def _interrupt_after(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Ctrl-C (or a kill) right after the line starting with ``prefix`` is printed."""
    real = distill.run._say

    def say(text: str) -> None:
        real(text)
        if text.startswith(prefix):
            raise KeyboardInterrupt

    monkeypatch.setattr(distill.run, "_say", say)


def _assert_refused(err: str, stage: str, keys: list[str]) -> None:
    assert err.startswith("error: ") and "Traceback" not in err
    assert "different config" in err and f"--force {stage}" in err and "run.name" in err, err
    for key in keys:
        assert key in err, f"{key!r} not named in: {err}"


def test_changed_config_refused_for_a_finished_stage(teacher_run: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run_dir = teacher_run
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.epochs=1"]) == 0
    made = (run_dir / "teacher" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.epochs=1", "teacher.lr=0.002"]) == 2
    _assert_refused(capsys.readouterr().err, "teacher", ["teacher.lr"])
    assert (run_dir / "teacher" / "model.safetensors").read_bytes() == made
    # A key the stage does not depend on changes nothing.
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.epochs=1", "export.opset=18"]) == 0
    assert "[teacher] finished earlier" in capsys.readouterr().out
    # The way out offered: --force redoes the stage with the new config.
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.epochs=1", "teacher.lr=0.002",
                  "--force", "teacher"]) == 0
    assert json.loads((run_dir / "teacher" / "stage.json").read_text())["config"]["teacher"]["lr"] == 0.002


def test_changed_config_refused_for_an_interrupted_stage(teacher_run: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run_dir = teacher_run
    _interrupt_after(monkeypatch, "[teacher] epoch 1/")  # interrupted in the middle of epoch 2
    assert _main([str(cfg), "--stages", "data,teacher"]) == 130
    monkeypatch.undo()
    ckpt = (run_dir / "teacher" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.lr=0.002", "teacher.label_smoothing=0.1"]) == 2
    err = capsys.readouterr().err
    _assert_refused(err, "teacher", ["teacher.lr: 0.0005 -> 0.002", "teacher.label_smoothing: 0.0 -> 0.1"])
    assert (run_dir / "teacher" / "last.ckpt").read_bytes() == ckpt
    # The other way out offered: a new run.name starts afresh beside the old run.
    assert _main([str(cfg), "--stages", "data,teacher", "teacher.lr=0.002", "run.name=tiny2"]) == 0
    assert (run_dir.parent / "tiny2" / "teacher" / "meta.json").is_file()
    assert (run_dir / "teacher" / "last.ckpt").read_bytes() == ckpt


def test_changed_config_refused_for_the_data_stage(teacher_run: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run_dir = teacher_run
    assert _main([str(cfg), "--stages", "data"]) == 0
    manifest = (run_dir / "data" / "manifest.csv").read_bytes()
    capsys.readouterr()
    assert _main([str(cfg), "--stages", "data", "data.synthetic.num_val=12", "run.seed=1"]) == 2
    _assert_refused(capsys.readouterr().err, "data", ["data.synthetic.num_val", "seed"])
    assert (run_dir / "data" / "manifest.csv").read_bytes() == manifest


def test_refused_rerun_keeps_the_config_the_run_was_made_with(teacher_run: tuple[Path, Path]) -> None:
    """config.yaml is 'the resolved config, as run' (README); a refused rerun must not rewrite it."""
    cfg, run_dir = teacher_run
    assert _main([str(cfg), "--stages", "data"]) == 0
    before = (run_dir / "config.yaml").read_text()
    assert _main([str(cfg), "--stages", "data", "data.synthetic.num_val=12"]) == 2
    assert (run_dir / "config.yaml").read_text() == before
