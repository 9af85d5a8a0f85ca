"""The Colab notebook, executed headlessly with nbclient on the CPU: every cell must succeed.

The notebook is a thin shell over the CLI, so the test runs it as a user would (Run all), with the
quickstart config and tiny settings put in place of its parameters cell. The kernel runs this very
interpreter (the project's environment), whatever ``python3`` kernels the machine has installed.
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
except ImportError as exc:  # fail, not skip: the notebook test is part of the README's test command
    raise ImportError(f"{exc}; the notebook tests need the test extras: pip install -e '.[test]'") from exc

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"

#: The knobs of the notebook's form; its parameters cell defines exactly these.
PARAMETERS = ("CONFIG", "RUN_NAME", "DATA_SOURCE", "DATA_PATH", "EPOCHS_TEACHER", "EPOCHS_STUDENT", "IMG_SIZE",
              "STUDENT_ARCH", "USE_DRIVE", "OUTPUT_DIR", "EXTRA_OVERRIDES", "PREDICT_IMAGES", "REPO_URL")

#: Keeps the whole pipeline to about 2 CPU-minutes: 32 px, one epoch per stage, fp32
#: export of the deployed model only, few bootstrap samples, the smallest latency run allowed.
SMALL_OVERRIDES = [
    "data.synthetic.num_train=64", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
    "data.synthetic.defect_ratio=0.5", "data.synthetic.variants=1",
    "prune.epochs=1", "export.int8=false", "export.models=[student_pruned]",
    "eval.bootstrap=100", "profile.runtimes=[eager,onnx]", "profile.warmup=2", "profile.runs=30",
    "profile.allow_busy=true",  # a busy CI machine would otherwise withhold the latency figures
]


def _parameters(out: Path, **values: object) -> str:
    """Source of a parameters cell: small CPU settings, with ``values`` replacing any of them."""
    params: dict[str, object] = {
        "CONFIG": "configs/quickstart.yaml", "RUN_NAME": "nbtest", "DATA_SOURCE": "synthetic", "DATA_PATH": "",
        "EPOCHS_TEACHER": 1, "EPOCHS_STUDENT": 1, "IMG_SIZE": 32, "STUDENT_ARCH": "mobilenetv3_small_100",
        "USE_DRIVE": True,  # outside Colab it must be ignored, not fail
        "OUTPUT_DIR": str(out), "EXTRA_OVERRIDES": SMALL_OVERRIDES, "PREDICT_IMAGES": "",
        "REPO_URL": "https://github.com/<you>/sealant-distill",
    }
    params.update(values)
    return "".join(f"{name} = {value!r}\n" for name, value in params.items())


def _assigned(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def _load() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    found = [c for c in nb.cells if c.get("id") == cell_id]
    assert len(found) == 1, f"the notebook has {len(found)} cell(s) with id {cell_id!r}, expected one"
    return found[0]


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _with_parameters(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    cell = _parameters_cell(nb)
    assert _assigned(source) == _assigned(cell.source), "the injected parameters no longer match the notebook's"
    cell.source = source
    # Run in the project's environment: fail at once if the kernel is another interpreter.
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not the project Python'"))
    return nb


def _stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _execute(nb: nbformat.NotebookNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             cwd: Path = ROOT) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel on this interpreter, in ``cwd`` (the repository root, as
    when the notebook is opened from a checkout); on a cell error, fail with the end of that cell's
    output (where the command's own error message is)."""
    kernels = tmp_path / "kernels"
    (kernels / "sealant-test").mkdir(parents=True)
    (kernels / "sealant-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sealant-distill test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    km = AsyncKernelManager(kernel_name="sealant-test",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False))
    client = NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = next((c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        tail = _stream_text(failed)[-4000:] if failed is not None else ""
        pytest.fail(f"notebook cell {failed.get('id') if failed else '?'!r} failed.\n--- its output (end) ---\n"
                    f"{tail}\n--- error ---\n{exc}", pytrace=False)
    return nb


def _displays(cell: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for o in cell.get("outputs", []) if o.get("output_type") == "display_data" and mime in o.get("data", {})]


# ----------------------------------------------------------------------------- the notebook file
def test_notebook_is_a_clean_colab_form_over_the_cli() -> None:
    nb = _load()
    nbformat.validate(nb)
    params = _parameters_cell(nb)
    assert _assigned(params.source) == set(PARAMETERS)
    for name in PARAMETERS:
        line = next(ln for ln in params.source.splitlines() if ln.startswith(f"{name} ="))
        assert "#@param" in line, f"{name} has no Colab form annotation"
    # Colab form fields hold literals: each default must be one (ValueError otherwise).
    defaults = {t.id: ast.literal_eval(node.value) for node in ast.parse(params.source).body
                if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert defaults["CONFIG"] == "configs/vit_to_mbv3.yaml" and (ROOT / defaults["CONFIG"]).is_file()
    assert isinstance(defaults["EXTRA_OVERRIDES"], list) and defaults["DATA_SOURCE"] in ("synthetic", "upload_zip", "drive_path")
    for config in {c for ln in params.source.splitlines() for c in ln.split('"') if c.startswith("configs/")}:
        assert (ROOT / config).is_file(), f"the form offers {config}, which does not exist"

    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None, f"cell {cell.id!r} is stored with outputs"
        tree = ast.parse(cell.source)  # plain Python: no shell magics that would hide a failed command
        # Every google.colab import sits in a try whose handler catches ImportError (runs outside Colab).
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
            ):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith("google.colab") for n in names):
                assert id(node) in guarded, f"cell {cell.id!r} imports google.colab without try/except ImportError"

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "colab.research.google.com/github/" in readme and "notebooks/colab.ipynb" in readme


def _up_to(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    """The notebook's cells up to and including ``cell_id``."""
    ids = [c.get("id") for c in nb.cells]
    assert cell_id in ids, f"the notebook has no cell with id {cell_id!r}"
    nb.cells = nb.cells[: ids.index(cell_id) + 1]
    return nb


# ----------------------------------------------------------------------------- install
def test_notebook_clones_the_repository_when_not_inside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened outside a checkout (Colab's /content), the install cell clones REPO_URL, works in the
    clone, and leaves an installed project as it is."""
    source = tmp_path / "origin"
    source.mkdir()
    (source / "pyproject.toml").write_text('[project]\nname = "sealant-distill"\nversion = "0.0.0"\n')
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "pyproject.toml"], ["commit", "-q", "-m", "origin"]):
        subprocess.run([*git, *args], cwd=source, check=True, capture_output=True)
    work = tmp_path / "content"
    work.mkdir()
    nb = _up_to(_load(), "install")
    nb.cells.append(nbformat.v4.new_code_cell(
        f"assert REPO_DIR == Path({str(work / 'sealant-distill')!r}) == Path.cwd(), (REPO_DIR, Path.cwd())"))
    nb = _execute(_with_parameters(nb, _parameters(tmp_path / "runs", REPO_URL=source.as_uri())), tmp_path,
                  monkeypatch, cwd=work)
    assert (work / "sealant-distill" / "pyproject.toml").is_file()
    assert "already installed" in _stream_text(_cell(nb, "install"))


# ----------------------------------------------------------------------------- data selection
def _synth(out: Path, fmt: str) -> None:
    subprocess.run([sys.executable, "-m", "data.synth", str(out), "--num-images", "24", "--format", fmt,
                    "--size", "32", "--defect-ratio", "0.5"], cwd=ROOT, check=True, capture_output=True, timeout=300)


def _zip(folder: Path, zip_path: Path) -> None:
    """Zip ``folder`` as a Mac user would: wrapped in its own folder, with resource forks beside it."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, Path(folder.name) / path.relative_to(folder))
        archive.writestr("__MACOSX/._data.yaml", b"\0")


@pytest.mark.parametrize("layout", ["yolo_zip", "folder_dir"])
def test_notebook_data_cell_finds_the_layout_the_pipeline_reads(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data cell unpacks a zip (outside Colab: DATA_PATH names it), steps into its wrapping
    folder, recognises the layout, and the data stage accepts the overrides it makes."""
    out = tmp_path / "runs"
    if layout == "yolo_zip":
        _synth(tmp_path / "beads", "yolo")
        _zip(tmp_path / "beads", tmp_path / "beads.zip")
        values = {"DATA_SOURCE": "upload_zip", "DATA_PATH": str(tmp_path / "beads.zip")}
        expected = ["data.source=yolo", f"data.path={out / '_data' / 'beads' / 'beads'}"]
    else:
        _synth(tmp_path / "classes", "folder")
        values = {"DATA_SOURCE": "drive_path", "DATA_PATH": str(tmp_path / "classes")}
        expected = ["data.source=folder", f"data.path={tmp_path / 'classes'}"]
    nb = _up_to(_load(), "data")
    nb.cells.append(nbformat.v4.new_code_cell(
        f"assert DATA_OVERRIDES == {expected!r}, DATA_OVERRIDES\n"
        "sh(sys.executable, '-m', 'distill.run', 'configs/quickstart.yaml', '--stages', 'data', *DATA_OVERRIDES,\n"
        "   f'run.output_dir={OUT}', 'run.name=datacheck', cwd=REPO_DIR)"))
    nb = _execute(_with_parameters(nb, _parameters(out, **values)), tmp_path, monkeypatch)
    assert len((out / "datacheck" / "data" / "manifest.csv").read_text().splitlines()) == 1 + 24


# ----------------------------------------------------------------------------- the whole notebook
@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run all: GPU check, install (skipped: installed), Drive (skipped: not Colab), synthetic data,
    the pipeline, the report and plots inline, predictions with Grad-CAM overlays on synthetic
    beads. Most of it is the pipeline, about 2 CPU-minutes: 1 to 3 minutes on 2 shared cores."""
    out = tmp_path / "runs"
    nb = _execute(_with_parameters(_load(), _parameters(out)), tmp_path, monkeypatch)
    run_dir = out / "nbtest"

    # The form's fields reached the command line, and its output streamed into the cell.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["source"] == "synthetic" and config["data"]["synthetic"]["image_size"] == 32
    assert (config["teacher"]["epochs"], config["student"]["epochs"]) == (1, 1)
    assert (config["teacher"]["img_size"], config["student"]["img_size"]) == (32, 32)
    assert config["student"]["arch"] == "mobilenetv3_small_100" and config["data"]["synthetic"]["num_train"] == 64
    assert "[teacher] epoch 1/1" in _stream_text(_cell(nb, "train"))

    report = _cell(nb, "report")
    tables = [md for md in _displays(report, "text/markdown") if "| model |" in md]
    assert tables, "the report table was not shown"
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert plots and len(_displays(report, "image/png")) == len(plots)

    predictions = out / "nbtest-predict" / "predictions.csv"
    with predictions.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["decision"] in ("defect", "normal") and not r["error"] for r in rows)
    assert all(Path(r["gradcam"]).is_file() for r in rows)
    assert len(_displays(_cell(nb, "predict"), "image/png")) == 8
