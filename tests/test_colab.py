"""Every chapter, run top to bottom as a fresh Colab runtime would run it.

A fresh venv holds Colab's packages at Colab's versions (``tests/colab-base.txt``; torch stays the
version this machine has) and nothing of the book's tools: no jupyter-book, myst-nb, nbval, ninja,
and no pba. Each chapter then runs in a kernel of that venv from a folder outside the checkout
(Colab's ``/content``), with ``google.colab`` importable, so its install cell runs: it installs
the pba of this checkout (a wheel built once, standing in for the tagged GitHub URL) and the
chapter's extras. Committed results come from ``$PBA_RESULTS_DIR`` (this checkout's ``results/``)
in place of GitHub, and the data from the ``PBA_*_DIR`` folders when set (CI) or the Hub. A
chapter that imports something its install cell does not provide fails here.

The venv is built once per session (about a minute with pip's cache warm); the chapters take
about as long as their strict nbval runs. ``PBA_SKIP_COLAB=1`` skips these tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from colab_cells import REPOSITORY, chapters, install_cell  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("PBA_SKIP_COLAB") == "1", reason="PBA_SKIP_COLAB=1")

#: What Colab has imported before a notebook's first cell: enough for ``"google.colab" in sys.modules``.
COLAB_STUB = textwrap.dedent(
    """
    import sys, types
    sys.modules.setdefault("google.colab", types.ModuleType("google.colab"))
    """
).strip()


def test_install_cells_are_current() -> None:
    """Every chapter's first cell is the one ``scripts/colab_cells.py`` writes for this version."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab_cells.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def colab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A venv like Colab's runtime, a wheel of this checkout, and a kernel spec for the venv."""
    home = tmp_path_factory.mktemp("colab")
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "tests" / "colab-base.txt"), f"torch=={torch_version}"], check=True)
    wheels = home / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    kernels = home / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "Colab (simulated)", "language": "python"}
    (kernels / "kernel.json").write_text(json.dumps(spec))
    content = home / "content"  # Colab's working directory: outside any checkout
    content.mkdir()
    return {"python": python, "wheel": next(wheels.glob("*.whl")), "jupyter": home / "jupyter", "content": content}


def run_as_colab(notebook: dict, colab: dict[str, Path], timeout: int = 900) -> dict:
    """Execute ``notebook`` (a dict) in the Colab venv: stub first, install cell pointed at the wheel."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.reads(json.dumps(notebook), as_version=4)  # sources as strings
    url = re.compile(rf"git\+{re.escape(REPOSITORY)}@v[\w.]+")
    for cell in nb.cells:
        if cell.cell_type == "code" and "google.colab" in cell.source:
            cell.source = url.sub(colab["wheel"].as_uri(), cell.source)
            cell.metadata["tags"] = []  # Colab ignores the tags that keep CI and the book from running it
    nb.cells.insert(0, nbformat.v4.new_code_cell(COLAB_STUB))
    env_before = dict(os.environ)
    os.environ["JUPYTER_PATH"] = str(colab["jupyter"])
    os.environ["PBA_RESULTS_DIR"] = str(ROOT / "results")
    os.environ.pop("KERAS_BACKEND", None)  # unset on Colab
    os.environ.pop("PYTHONPATH", None)
    try:
        client = NotebookClient(
            nb, kernel_name="colab", timeout=timeout, resources={"metadata": {"path": str(colab["content"])}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return nb


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_chapter_runs_on_a_fresh_colab(path: Path, colab: dict[str, Path]) -> None:
    executed = run_as_colab(json.loads(path.read_text()), colab)
    install = next(cell for cell in executed.cells if "%pip install" in cell.source)
    printed = "".join(output.get("text", "") for output in install.outputs)
    assert "installed pay-better-attention" in printed, printed  # the install cell ran, as on Colab
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)  # and so did every other cell


def test_a_chapter_that_imports_what_it_did_not_install_fails(colab: dict[str, Path]) -> None:
    """The test of the test: ``myst_nb`` is not on Colab, so importing it must fail here."""
    from nbclient.exceptions import CellExecutionError

    cells = [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": install_cell("00_probe")},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": "import pba\nfrom myst_nb import glue"},
    ]
    notebook = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    with pytest.raises(CellExecutionError, match="No module named 'myst_nb'"):
        run_as_colab(notebook, colab, timeout=300)
