"""Re-execute the book's chapters in place and store their outputs (timing metadata off).

    python scripts/record_chapters.py                 # every chapter in _toc.yml order
    python scripts/record_chapters.py book/04_super.ipynb

Run it after changing `pba` code that chapters use, then `python -m pytest` (strict nbval checks
that the stored outputs reproduce). Cells tagged `skip-execution` (the Colab install cell) are
left as they are. Each recording is logged in `book/_status.json`, from which `book/status.md`
(the book's status page) is regenerated.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
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


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_status(log: dict) -> None:
    """Regenerate the status page from the log of recordings."""
    lines = [
        "# Status",
        "",
        "When and where each chapter's stored outputs were last recorded (by",
        "`python scripts/record_chapters.py`), how long the chapter took to execute, and with which",
        "versions. CI re-executes every chapter under strict nbval and checks that these outputs",
        "reproduce.",
        "",
        "| chapter | recorded (UTC) | seconds | machine | Python | torch | jupyter-book |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in sorted(log):
        e = log[name]
        lines.append(
            f"| {{doc}}`{name.removesuffix('.ipynb')}` | {e['date']} | {e['seconds']:.0f} | {e['machine']} "
            f"| {e['python']} | {e['torch']} | {e['jupyter_book']} |"
        )
    (BOOK / "status.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
    status_file = BOOK / "_status.json"
    log = json.loads(status_file.read_text()) if status_file.exists() else {}
    for path in paths:
        seconds = record(path)
        print(f"{path.name}: {seconds:.1f} s", flush=True)
        log[path.name] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "seconds": round(seconds, 1),
            "machine": _machine(),
            "python": platform.python_version(),
            "torch": version("torch"),
            "jupyter_book": version("jupyter-book"),
        }
        status_file.write_text(json.dumps(log, indent=1, sort_keys=True) + "\n")
        write_status(log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
