"""Every file under ``results/`` and the command that regenerates it.

    python scripts/results_manifest.py                  # print the manifest
    python scripts/results_manifest.py --check          # also exit 1 naming any file with no known command
    python scripts/results_manifest.py --results DIR    # another results directory

A file that records its own command is read: a JSON file's ``"command"`` key, or a text file whose
first line is ``command: ...``. A figure (``.png``, ``.svg``) is written by the command of the JSON
file with the same name beside it. Any other file needs an entry in :data:`KNOWN`. The IMDB
commands read the data from ``$PBA_IMDB_DIR`` (or the Hugging Face Hub); run them from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Commands of files that do not record their own, by path relative to the results directory.
KNOWN: dict[str, str] = {
    # Written by the script (its first line then names the command); the committed copy predates it.
    "bench-imdb-grid-configs.txt": "python benchmarks/imdb_grid_configs.py --out results/bench-imdb-grid-configs.txt",
}

FIGURES = (".png", ".svg")


def recorded_command(path: Path) -> str | None:
    """The command ``path`` records about itself, or ``None``."""
    if path.suffix == ".json":
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        command = payload.get("command") if isinstance(payload, dict) else None
        return command.strip() if isinstance(command, str) and command.strip() else None
    if path.suffix == ".txt":
        try:
            with path.open() as file:
                first = file.readline()
        except (OSError, UnicodeDecodeError):
            return None
        if first.startswith("command:") and first[len("command:"):].strip():
            return first[len("command:"):].strip()
    return None


def command_for(path: Path, results: Path) -> tuple[str | None, str]:
    """``(command, where it was found)`` for one results file; ``(None, why)`` if none is known."""
    own = recorded_command(path)
    if own is not None:
        return own, "recorded in the file"
    if path.suffix in FIGURES:
        data = path.with_suffix(".json")
        command = recorded_command(data) if data.exists() else None
        if command is not None:
            return command, f"with {data.relative_to(results).as_posix()}"
        return None, f"a figure without a JSON file beside it that records its command ({data.name})"
    relative = path.relative_to(results).as_posix()
    if relative in KNOWN:
        return KNOWN[relative], "from the manifest's table"
    return None, "records no command and is not in the manifest's table"


def manifest(results: Path) -> list[tuple[str, str | None, str]]:
    """``(relative path, command or None, source)`` for every file under ``results``, sorted."""
    rows = []
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        command, source = command_for(path, results)
        rows.append((path.relative_to(results).as_posix(), command, source))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results directory (default: results/)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any file has no known command")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results must be a directory, got {args.results}")
    rows = manifest(args.results)
    unknown = [(name, source) for name, command, source in rows if command is None]
    prefix = args.results.name + "/"
    for name, command, source in rows:
        if command is not None:
            print(f"{prefix}{name}\n    {command}    ({source})")
    for name, source in unknown:
        print(f"{prefix}{name}: no known command ({source})", file=sys.stderr)
    if args.check:
        if unknown:
            return 1
        print(f"{len(rows)} files, every one with the command that regenerates it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
