"""Regenerate compare_stabilizers.ipynb from its jupytext source compare_stabilizers.py, or run
the notebook headless into another file.

    .venv/bin/python notebooks/build_ipynb.py
        writes notebooks/compare_stabilizers.ipynb without outputs; each cell's id is derived
        from its type and source, so an unchanged source rewrites nothing and an edit changes
        the ids of the edited cells only
    .venv/bin/python notebooks/build_ipynb.py --execute runs/compare.ipynb ['WORKDIRS=["runs/a"]' ...]
        runs the notebook in a fresh python3 kernel in the current folder, with NAME=EXPR
        assignments appended to its cell tagged "parameters", and writes the executed copy
        (the shipped .ipynb is never touched; runs/ is git-ignored)
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import jupytext
import nbformat

SOURCE = Path(__file__).resolve().parent / "compare_stabilizers.py"


def build(source: Path = SOURCE) -> nbformat.NotebookNode:
    """The notebook of ``source`` with content-derived cell ids (``{sha1[:8]}``, then
    ``{sha1[:8]}-{n}`` for the n-th repeat of an identical cell)."""
    nb = jupytext.read(source)
    seen: dict[str, int] = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        n = seen.get(digest, 0)
        seen[digest] = n + 1
        cell.id = digest if n == 0 else f"{digest}-{n}"
    return nb


def execute(
    nb: nbformat.NotebookNode, cwd: Path, params: list[str] = (), timeout: int = 600
) -> nbformat.NotebookNode:
    """Run ``nb`` in place in a fresh python3 kernel started in ``cwd``, with the lines
    ``params`` ("NAME = EXPR") appended to its cell tagged parameters."""
    from nbclient import NotebookClient

    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "".join(f"\n{p}" for p in params)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", metavar="OUT", help="run the notebook, write it to OUT")
    parser.add_argument("params", nargs="*", help="NAME=EXPR overrides of the parameters cell")
    args = parser.parse_args()
    if args.params and not args.execute:
        parser.error("NAME=EXPR parameters need --execute OUT")
    for p in args.params:
        if not p.partition("=")[0].isidentifier() or "=" not in p:
            parser.error(f"parameter {p!r}: expected NAME=EXPR, e.g. 'LR=0.1'")
    if args.execute:
        out = Path(args.execute)
        if out.resolve() == SOURCE.with_suffix(".ipynb"):
            parser.error(f"--execute {out} would overwrite the shipped notebook; pick another file")
        nb = execute(build(), Path.cwd(), [p.replace("=", " = ", 1) for p in args.params])
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        print(f"wrote {out}")
    else:
        target = SOURCE.with_suffix(".ipynb")
        jupytext.write(build(), target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
