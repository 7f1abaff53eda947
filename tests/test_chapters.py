"""Chapters must not drift from pba: their step-by-step classes equal pba's layers.

Only the cells tagged ``definition`` (imports and class definitions) are executed, so each
chapter's final class is checked without running the whole notebook a second time.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch

import pba

BOOK = Path(__file__).resolve().parent.parent / "book"

# chapter -> (final class, constructor kwargs, pba variant)
CHAPTERS = {
    "01_attention.ipynb": ("MultiHeadFused", {}, "standard"),
    "02_optimised.ipynb": ("OptimisedFused", {}, "optimised"),
    "03_efficient.ipynb": ("EfficientFused", {}, "efficient"),
    "04_super.ipynb": ("SuperFused", {"context_length": 8}, "super"),
}


def chapter_definitions(name: str) -> dict:
    notebook = nbformat.read(BOOK / name, as_version=4)
    cells = [c for c in notebook.cells if c.cell_type == "code" and "definition" in c.metadata.get("tags", [])]
    assert cells, f"{name} has no cell tagged 'definition'"
    namespace: dict = {"__name__": f"chapter_{name.split('.')[0]}"}
    for cell in cells:
        exec(compile(cell.source, f"{name}:definition", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_chapter_class_equals_pba(name: str) -> None:
    class_name, kwargs, variant = CHAPTERS[name]
    namespace = chapter_definitions(name)
    torch.manual_seed(0)
    ours = namespace[class_name](16, 4, **kwargs)
    library = pba.make_attention(variant, 16, 4, **kwargs)
    library.load_state_dict(ours.state_dict())  # same names, same shapes, nothing missing
    for p in ours.parameters():  # non-trivial biases
        torch.nn.init.normal_(p, std=0.3)
    library.load_state_dict(ours.state_dict())
    for length in (8, 5):
        x = torch.randn(2, length, 16)
        for causal in (False, True):
            torch.testing.assert_close(ours(x, is_causal=causal), library(x, is_causal=causal), atol=1e-5, rtol=1e-5)


def test_every_chapter_has_a_colab_install_cell_that_nothing_runs() -> None:
    for path in sorted(BOOK.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        first_code = next(c for c in notebook.cells if c.cell_type == "code")
        tags = set(first_code.metadata.get("tags", []))
        assert {"nbval-skip", "skip-execution"} <= tags, path.name
        # pinned to this version's tag, and never forcing an upgrade of Colab's packages
        assert "google.colab" in first_code.source and f"@v{pba.__version__}" in first_code.source, path.name
        assert "--upgrade" not in first_code.source and " -U " not in first_code.source, path.name
