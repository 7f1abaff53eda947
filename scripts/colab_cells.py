"""Write (or check) the first cell of every chapter: what it installs on Colab.

    python scripts/colab_cells.py            # rewrite the cells for the current pba.__version__
    python scripts/colab_cells.py --check    # exit 1 naming every chapter whose cell differs

The cell runs only on Colab (``google.colab`` imported). It installs ``pba`` from the repository
at the tag of this version (``v`` + ``pba.__version__``), so a chapter and the library it installs
cannot drift apart, with the ``experiments`` extra (the data and plotting libraries, which Colab
already has at versions pba accepts, so pip leaves them, and Colab's torch and numpy, alone), plus
what a chapter needs beyond that (:data:`EXTRA`). A release bumps ``pba.__version__``, tags the
commit ``v<version>`` and runs this script; ``tests/test_colab.py`` fails until it has run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pba import __version__  # noqa: E402

REPOSITORY = "https://github.com/pay-better-attention/pba"
#: Packages a chapter needs that neither pba nor Colab provides.
EXTRA: dict[str, tuple[str, ...]] = {
    "07_speed": ("ninja",),  # torch compiles the C++ training step with it; Colab has g++ but not ninja
}
TAGS = ["nbval-skip", "skip-execution"]  # neither CI nor the book build runs it


def chapters() -> list[Path]:
    """The notebooks in ``_toc.yml``, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [entry["file"] for part in toc["parts"] for entry in part["chapters"]]
    return [ROOT / f"{name}.ipynb" for name in files if (ROOT / f"{name}.ipynb").is_file()]


def install_cell(chapter: str, version: str = __version__) -> str:
    """The source of ``chapter``'s first cell."""
    extra = EXTRA.get(chapter, ())
    package = f"pay-better-attention[experiments] @ git+{REPOSITORY}@v{version}"
    what = ", ".join((f"pay-better-attention {version}", *extra))
    return "\n".join(
        [
            "# Colab only: install pba and what this chapter needs beyond Colab's own packages",
            "# (Colab's torch, numpy and matplotlib already meet pba's requirements, so pip keeps them).",
            "import sys",
            "",
            'if "google.colab" in sys.modules:',
            f'    %pip install -q "{package}"' + "".join(f" {name}" for name in extra),
            f'    print("installed {what}")',
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a cell differs")
    args = parser.parse_args(argv)
    stale = []
    for path in chapters():
        notebook = json.loads(path.read_text())
        cell = notebook["cells"][1] if notebook["cells"][0]["cell_type"] == "markdown" else notebook["cells"][0]
        wanted = install_cell(path.stem)
        if cell["cell_type"] != "code" or "google.colab" not in "".join(cell["source"]):
            raise SystemExit(f"{path.name}: the install cell must follow the title cell")
        if "".join(cell["source"]) == wanted and cell["metadata"].get("tags") == TAGS:
            continue
        stale.append(path.name)
        if not args.check:
            cell["source"] = wanted.splitlines(keepends=True)
            cell["metadata"]["tags"] = TAGS
            cell["outputs"], cell["execution_count"] = [], None
            path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    if args.check and stale:
        print("install cells out of date (run python scripts/colab_cells.py): " + ", ".join(stale))
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale else "every install cell is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
