"""notebooks/compare_stabilizers: executed headless on a tiny real sweep and on hand-written
workdirs (an interrupted sweep, a diverged run, metrics the model did not log)."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from test_results import run_id, write_sweep_dir
from test_sweep import write_files

from stability.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "notebooks" / "compare_stabilizers.py"
SECTIONS = (
    "1. LR sensitivity",
    "2. Attention-entropy collapse",
    "3. Attention-logit growth",
    "4. Output-logit divergence",
    "5. Update size and Adam's ε",
    "6. Attention sinks and the residual norm at position 0",
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """2 settings (qk_norm off/on) × 2 LRs, 8 steps: about a minute on a CPU."""
    tmp = tmp_path_factory.mktemp("sweep")
    config_py, sweep_py = write_files(tmp, lrs=(1e-2, 1.0), steps=8)
    run_sweep(sweep_py, tmp / "w", config_spec=config_py, progress=False, report=False)
    return tmp / "w"


def execute(monkeypatch, cwd: Path, **params) -> nbformat.NotebookNode:
    """The notebook with its parameters cell extended by ``params``, run in a fresh kernel."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(SOURCE)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb


def figures_per_section(nb) -> dict[str, int]:
    counts, section = {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            section = cell.source[3:].splitlines()[0]
            counts[section] = 0
        elif cell.cell_type == "code" and section:
            counts[section] += sum("image/png" in o.get("data", {}) for o in cell.outputs)
    return counts


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_ipynb_is_the_unexecuted_py():
    ipynb = nbformat.read(SOURCE.with_suffix(".ipynb"), as_version=4)
    assert [c.source for c in ipynb.cells] == [c.source for c in jupytext.read(SOURCE).cells], (
        "regenerate: jupytext --to ipynb notebooks/compare_stabilizers.py"
    )
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_on_a_tiny_sweep(tiny_sweep, monkeypatch, tmp_path):
    nb = execute(monkeypatch, tmp_path, WORKDIRS=[str(tiny_sweep)], LR=1.0, EARLY_STEP=7)
    figures = figures_per_section(nb)
    assert list(figures) == list(SECTIONS)
    assert all(n >= 1 for n in figures.values()), figures
    assert figures[SECTIONS[2]] >= 2 and figures[SECTIONS[4]] == 2 and figures[SECTIONS[5]] == 2
    out = printed(nb)
    assert "4 runs, 2 setting(s); per-run panels at lr=1" in out
    assert "Nothing to plot" not in out and "Unfinished" not in out


def test_notebook_on_an_interrupted_sweep_with_missing_metrics(monkeypatch, tmp_path):
    write_sweep_dir(tmp_path / "a", sink=False, eps=False)  # a diverged and a cut run
    write_sweep_dir(tmp_path / "b", settings=("z_loss=0",), lrs=(0.01,))  # only a cut run
    # relative workdirs are read from the notebook's working folder
    nb = execute(monkeypatch, tmp_path, WORKDIRS=["a", "b"], LR=2.0)
    figures = figures_per_section(nb)
    assert all(figures[s] >= 1 for s in SECTIONS[:5]), figures
    assert figures[SECTIONS[5]] == 0
    out = printed(nb)
    cut = f"{run_id('qk_norm=True', 1.0)}, {run_id('z_loss=0', 0.01)}"
    assert f"Unfinished (no results record yet): {cut}" in out
    assert "per-run panels at lr=1\n" in out
    assert "No grad/rms_over_eps" in out
    assert "attn/bos_mass/layer_* is not in the histories" in out
    assert "resid/bos_norm_ratio/layer_* is not in the histories" in out
