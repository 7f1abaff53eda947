"""The book's editorial rules, checked on the committed chapters.

* **No unglued result in prose.** A *result-like number* is a decimal with a fractional part
  (``0.976``, ``72.85``) or a percentage (``78 %``). In a chapter's prose every such number must
  come from a run, through ``{glue:text}``. Prose excludes math, code, MyST roles (a glue role
  included), link targets, and the Exercises section with its solutions (exercises pose
  hypothetical numbers). What remains may hold only the numbers in :data:`NOT_RESULTS`, each
  with the reason it is not a result: a setting, a published number quoted as such, or a fact of
  arithmetic. Integers (counts, sizes) are not checked: a hand-typed "20,000 words" is a setting.
* **Figures that teach.** No cell shows a raw image: every figure is glued and placed by a
  ``{glue:figure}`` with a ``:name:``, an ``:alt:`` text and a caption, and the text refers to it
  with ``{numref}``.
* **Every exercise has its solution** (a ``Solution N`` dropdown).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

#: Numbers allowed in prose without glue, per page, each with why it is not a result of a run.
_RULE = {"95 %": "the confidence level of the book's rule", "5 %": "the test level of the book's rule"}
_FORMULA = {"25 %": "optimised drops 1 of 4 weight matrices", "50 %": "efficient drops 2 of 4"}
NOT_RESULTS: dict[str, dict[str, str]] = {
    "intro.md": {"17 %": "the paper's claim (v2), quoted", "10 %": "the paper's claim (v3), quoted"},
    "05_costs.ipynb": _FORMULA,
    "06_imdb.ipynb": {
        **_FORMULA,
        "10 %": "setting: the paper protocol's validation share",
        "0.1": "setting: the model's dropout",
        "0.5": "setting: the reference's threshold",
        "78 %": "the paper's published IMDB accuracy, quoted",
    },
    "08_ablations.ipynb": {"0.5": "setting: the reference's threshold", "0.62": "arithmetic: sigmoid(0.5)"},
    "10_generation.ipynb": {
        **_FORMULA,
        "1.88": "nanoGPT's published loss, quoted",
        "90 %": "setting: nanoGPT's training share",
        "10 %": "setting: nanoGPT's validation share",
        "0.1": "setting: nanoGPT's weight decay",
        "0.0029": "arithmetic: sd of rounding to 0.01, 0.01/sqrt(12)",
    },
    "11_vision.ipynb": {"0.05": "setting: the grid's weight decay", "98 %": "the benchmark figure tested against"},
    "12_verdict.ipynb": {
        "4.3": "arithmetic: t quantile, 2 degrees of freedom",
        "2.3": "arithmetic: t quantile, 8 degrees of freedom",
        "18 %": "arithmetic: level of a 2-SE rule with 2 degrees of freedom",
        "0.5": "setting: the reference's threshold",
        "0.05": "the conventional p-value threshold",
        "17 %": "the paper's claim (v2), quoted",
        "10 %": "the paper's claim (v3), quoted",
    },
}

RESULT_LIKE = re.compile(r"(?<![\w.,{])(\d[\d,]*\.\d+(?:\s?%)?|\d[\d,]*\s?%)(?!\.?\d)")  # a unit may follow: 0.96x, 1.5 ms


def pages() -> list[Path]:
    """Every page of the book's table of contents."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    found = []
    for name in files:
        for suffix in (".ipynb", ".md"):
            if (ROOT / f"{name}{suffix}").exists():
                found.append(ROOT / f"{name}{suffix}")
    return found


def markdown(path: Path) -> list[str]:
    if path.suffix == ".md":
        return [path.read_text()]
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown"]


def prose(text: str) -> str:
    """``text`` without what the number rule does not read (see the module docstring)."""
    text = re.sub(r"^## Exercises.*?(?=^## |\Z)", " ", text, flags=re.S | re.M)
    text = re.sub(r":::\{admonition\} Solution.*?^:::", " ", text, flags=re.S | re.M)
    text = re.sub(r"^```(?!\{).*?^```", " ", text, flags=re.S | re.M)  # code blocks, not directives
    text = re.sub(r"^:[\w-]+:.*$", " ", text, flags=re.M)  # directive options (:alt:, :name:...)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"\$[^$]*\$", " ", text)
    text = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", text)
    text = re.sub(r"`[^`]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def unglued_numbers(path: Path) -> list[str]:
    allowed = {**_RULE, **NOT_RESULTS.get(path.name, {})}
    found = []
    for text in markdown(path):
        for match in RESULT_LIKE.finditer(prose(text)):
            number = re.sub(r"\s?%", " %", match.group(1))
            if number not in allowed:
                found.append(number)
    return found


PAGES = [p for p in pages() if p.name not in ("status.md", "api.md", "bibliography.md")]  # generated or reference


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_unglued_result_in_prose(path: Path) -> None:
    assert unglued_numbers(path) == [], (
        f"{path.name}: numbers in prose that no run glued; glue them, or say in NOT_RESULTS why they are not results"
    )


def test_the_number_rule_catches_a_typed_result() -> None:
    text = (
        "Accuracy was 73.69 % ({glue:text}`acc:.2f` glued), loss $1.88$ in math, `0.5` in code, "
        "a ratio of 0.976, a speed-up of 0.96x.\n\n## Exercises\n\n1. Suppose 12.5 %.\n"
    )
    assert [m.group(1) for m in RESULT_LIKE.finditer(prose(text))] == ["73.69 %", "0.976", "0.96"]


def test_every_allowed_number_is_still_used() -> None:
    """An entry of NOT_RESULTS that no page needs any more must go (it would hide a future result)."""
    for name, numbers in NOT_RESULTS.items():
        path = next(p for p in PAGES if p.name == name)
        texts = [prose(t) for t in markdown(path)]
        used = {re.sub(r"\s?%", " %", m.group(1)) for t in texts for m in RESULT_LIKE.finditer(t)}
        assert set(numbers) <= used, f"{name}: {sorted(set(numbers) - used)} allowed but not used"


NOTEBOOKS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_is_numbered_captioned_and_referenced(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    glued = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            assert not any(k.startswith("image/") for k in data), f"{path.name}: a figure shown without a caption"
            if any(k.startswith("application/papermill.record/image/") for k in data):
                glued.append(output["metadata"]["scrapbook"]["name"])
    figures = re.findall(r"```\{glue:figure\} (\S+)\n(.*?)```", text, flags=re.S)
    assert sorted(name for name, _ in figures) == sorted(glued), f"{path.name}: glued figures and placed figures differ"
    for name, body in figures:
        assert f":name: {name}\n" in body, f"{path.name}: {name} has no :name: (so no number)"
        alt = re.search(r"^:alt: (.+)$", body, flags=re.M)
        assert alt and len(alt.group(1).split()) >= 8, f"{path.name}: {name} needs an alt text that says what it shows"
        caption = re.sub(r"^:[\w-]+:.*$", "", body, flags=re.M).strip()
        assert len(caption.split()) >= 8, f"{path.name}: {name} needs a caption"
        assert f"{{numref}}`{name}`" in text, f"{path.name}: the text never refers to {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_a_solution(path: Path) -> None:
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    section = re.search(r"^## Exercises\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, f"{path.name} has no Exercises section"
    exercises = [int(n) for n in re.findall(r"^(\d+)\. ", section.group(1), flags=re.M)]
    solutions = [int(n) for n in re.findall(r"^:::\{admonition\} Solution (\d+)\n:class: dropdown", section.group(1), flags=re.M)]
    assert exercises and exercises == list(range(1, len(exercises) + 1)), f"{path.name}: exercises {exercises}"
    assert sorted(solutions) == exercises, f"{path.name}: exercises {exercises}, solutions {sorted(solutions)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_holds_no_myst_markup(path: Path) -> None:
    """A role such as {eq}`label` renders only in prose; in code it is noise for the reader."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert not re.search(r"\{(eq|doc|numref|cite|prf:ref|glue:text)\}`", cell.source), (path.name, cell.source[:80])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_follows_the_template(path: Path) -> None:
    """Goals first, then the chapter, then a Summary and Exercises, in that order (chapters 1-4's template)."""
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    positions = [text.find(marker) for marker in (":::{admonition} Goals", "\n## Summary", "\n## Exercises")]
    assert -1 not in positions and positions == sorted(positions), f"{path.name}: {positions}"
