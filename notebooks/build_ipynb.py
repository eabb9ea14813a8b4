"""Regenerate compare_stabilizers.ipynb from its jupytext source compare_stabilizers.py, without
outputs and with each cell's id derived from its type and source, so regenerating an unchanged
source rewrites nothing and an edit changes the ids of the edited cells only:

    .venv/bin/python notebooks/build_ipynb.py
"""

from __future__ import annotations

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


def main() -> None:
    target = SOURCE.with_suffix(".ipynb")
    jupytext.write(build(), target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
