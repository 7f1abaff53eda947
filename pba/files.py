"""Writing files so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomic", "write_json_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on one file system, so ``path`` holds either the old or the new content.
    The file is created readable by everyone (``0o644``), as ``open`` would with the usual umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb" if binary else "w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp.name, path)
    return path


def write_json_atomic(path: str | os.PathLike[str], payload: dict) -> Path:
    """``payload`` as indented JSON with a final newline, written atomically."""

    def dump(file: IO) -> None:
        json.dump(payload, file, indent=1, sort_keys=False)
        file.write("\n")

    return write_atomic(path, dump)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` written atomically."""
    return write_atomic(path, lambda file: file.write(text))
