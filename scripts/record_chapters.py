"""Re-execute the book's chapters in place and store their outputs (timing metadata off).

    python scripts/record_chapters.py                 # every chapter in _toc.yml order
    python scripts/record_chapters.py book/04_super.ipynb

Run it after changing `pba` code that chapters use, then `python -m pytest` (strict nbval checks
that the stored outputs reproduce). Cells tagged `skip-execution` (the Colab install cell) are
left as they are.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def record(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    skipped = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "skip-execution" in cell.metadata.get("tags", []):
            skipped[index] = cell
            cell.outputs = []
            cell.execution_count = None
    runnable = nbformat.from_dict(nb)
    runnable.cells = [c for i, c in enumerate(nb.cells) if i not in skipped]
    start = time.perf_counter()
    client = NotebookClient(
        runnable,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    client.execute()
    executed = iter(runnable.cells)
    nb.cells = [skipped[i] if i in skipped else next(executed) for i in range(len(nb.cells))]
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams(cell.outputs)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def _coalesce_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks, which arrive split at arbitrary points."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.output_type == "stream"
            and previous is not None
            and previous.output_type == "stream"
            and previous.name == output.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"{path.name}: {record(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
