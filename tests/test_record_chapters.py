"""scripts/record_chapters.py: stream coalescing and the generated status page."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("record_chapters", ROOT / "scripts" / "record_chapters.py")
record_chapters = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_chapters)


def test_consecutive_streams_are_joined() -> None:
    out = nbformat.v4.new_output
    outputs = [
        out("stream", name="stdout", text="a"),
        out("stream", name="stdout", text="b\n"),
        out("stream", name="stderr", text="warn\n"),
        out("stream", name="stdout", text="c\n"),
    ]
    merged = record_chapters._coalesce_streams(outputs)
    assert [(o.name, o.text) for o in merged] == [("stdout", "ab\n"), ("stderr", "warn\n"), ("stdout", "c\n")]


def test_status_page_lists_every_recorded_chapter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(record_chapters, "BOOK", tmp_path)
    entry = {"date": "2026-11-30 04:00", "seconds": 7.5, "machine": "CPU, 2 cores", "python": "3.11.7", "torch": "2.13.0", "jupyter_book": "1.0.4.post1"}
    record_chapters.write_status({"02_optimised.ipynb": entry, "01_attention.ipynb": {**entry, "seconds": 10.2}})
    page = (tmp_path / "status.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| {doc}")]
    assert rows[0].startswith("| {doc}`01_attention` | 2026-11-30 04:00 | 10 |")
    assert rows[1].startswith("| {doc}`02_optimised` |") and "1.0.4.post1" in rows[1]
