"""notebooks/compare_stabilizers: executed headless on a tiny real sweep and on hand-written
workdirs (an interrupted sweep, a diverged run, metrics the model did not log, a 3-seed sweep,
a single run); the shipped .ipynb is its .py built with content-derived cell ids."""

import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest
from test_results import run_id, write_seed_sweep, write_single_run, write_sweep_dir
from test_sweep import write_files

from stability import results
from stability.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "notebooks" / "compare_stabilizers.py"
_spec = importlib.util.spec_from_file_location("build_ipynb", ROOT / "notebooks" / "build_ipynb.py")
build_ipynb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_ipynb)
SECTIONS = (
    "1. LR sensitivity",
    "2. Attention-entropy collapse",
    "3. Attention-logit growth",
    "4. Output-logit divergence",
    "5. Update size and Adam's ε",
    "6. Attention sinks and the residual norm at position 0",
    "7. Scaling forecast across model sizes",
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """2 settings (qk_norm off/on) × 2 LRs × 2 seeds, 8 steps, each setting one vmapped
    program of one update per call (what the notebook reads does not depend on it)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config_py, sweep_py = write_files(
        tmp, lrs=(1e-2, 1.0), steps=8, qk_norm=(False, True), steps_per_call=1
    )
    run_sweep(
        sweep_py,
        tmp / "w",
        config_spec=config_py,
        strategy="vmap",
        seeds=2,
        progress=False,
        report=False,
    )
    return tmp / "w"


def execute(monkeypatch, cwd: Path, **params) -> nbformat.NotebookNode:
    """The notebook with its parameters cell extended by ``params``, run in a fresh kernel
    (what ``notebooks/build_ipynb.py --execute`` does)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    lines = [f"{k} = {v!r}" for k, v in params.items()]
    return build_ipynb.execute(build_ipynb.build(), cwd, lines, timeout=300)


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


def cells(nb) -> list[tuple[str, str, str]]:
    return [(c.id, c.cell_type, c.source) for c in nb.cells]


def test_ipynb_is_built_from_the_py():
    """Outputs are not compared: running the shipped notebook in place keeps this passing."""
    shipped = nbformat.read(SOURCE.with_suffix(".ipynb"), as_version=4)
    built = build_ipynb.build()
    nbformat.validate(built)
    assert cells(shipped) == cells(built), "regenerate: .venv/bin/python notebooks/build_ipynb.py"
    assert [c.source for c in built.cells] == [c.source for c in jupytext.read(SOURCE).cells]
    assert all(not c.get("outputs") for c in built.cells if c.cell_type == "code")


def test_cell_ids_depend_only_on_the_cells_content(tmp_path):
    edited = tmp_path / "nb.py"
    edited.write_text(SOURCE.read_text().replace("## 4. Output-logit", "## 4. Output logit"))
    before, after = build_ipynb.build(), build_ipynb.build(edited)
    assert len({c.id for c in before.cells}) == len(before.cells)
    changed = [a.source for a, b in zip(before.cells, after.cells, strict=True) if a.id != b.id]
    assert changed == ["## 4. Output-logit divergence"]


@pytest.mark.slow
def test_notebook_on_a_tiny_sweep(tiny_sweep, monkeypatch, tmp_path):
    nb = execute(monkeypatch, tmp_path, WORKDIRS=[str(tiny_sweep)], LR=1.0, EARLY_STEP=7)
    figures = figures_per_section(nb)
    assert list(figures) == list(SECTIONS)
    assert all(n >= 1 for n in figures.values()), figures
    assert figures[SECTIONS[2]] >= 2 and figures[SECTIONS[4]] == 2 and figures[SECTIONS[5]] == 2
    out = printed(nb)
    assert "8 runs, 2 setting(s); per-run panels at lr=1" in out
    assert "Up to 2 seeds per LR: section 1 uses all; the other panels show seed 0." in out
    assert "EARLY_STEP=7: read at step 6 (last logged step before)." in out
    assert "Nothing to plot" not in out and "Unfinished" not in out
    # the seeds of a point trained in one program from different initialisations
    table = results.runs_table(tiny_sweep)
    for _, point in table.groupby(["setting", "lr"]):
        assert list(point["seed"]) == [0, 1] and point["loss_at_init"].nunique() == 2


def test_notebook_on_seeds_a_single_run_an_interrupted_sweep_and_missing_metrics(
    monkeypatch, tmp_path
):
    write_sweep_dir(tmp_path / "a", sink=False, eps=False)  # a diverged and a cut run
    write_seed_sweep(tmp_path / "c", sink=False)  # 3 seeds × 3 LRs, disagreeing at 2 LRs
    write_single_run(tmp_path / "d", 1.0, sink=False, diverge_at=6)  # a single run's workdir
    # relative workdirs are read from the notebook's working folder
    nb = execute(monkeypatch, tmp_path, WORKDIRS=["a", "c", "d"], LR=2.0)
    figures = figures_per_section(nb)
    assert all(figures[s] >= 1 for s in SECTIONS[:5]), figures
    assert figures[SECTIONS[5]] == 0
    out = printed(nb)
    assert f"Unfinished (no results record yet): {run_id('qk_norm=True', 1.0)}\n" in out
    assert "14 runs, 4 setting(s); per-run panels at lr=1\n" in out
    assert "Up to 3 seeds per LR: section 1 uses all; the other panels show seed 0." in out
    assert "Seeds disagree at: c: qk_norm=False lr=0.1, c: qk_norm=False lr=1 (tolerance" in out
    assert "No loss at init (single runs) for d: LR sensitivity n/a." in out
    assert "EARLY_STEP=2000: read at step 4, 6, 8 (the runs end at step 8)." in out
    assert "No grad/rms_over_eps" in out
    assert "attn/bos_mass/layer_* is not in the histories" in out
    assert "resid/bos_norm_ratio/layer_* is not in the histories" in out
