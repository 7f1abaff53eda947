"""pba.notebook.glue where myst_nb is missing (Colab): numbers stay hidden when asked, figures show."""

from __future__ import annotations

import sys

import IPython.display
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pba.notebook import glue  # noqa: E402


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # "import myst_nb" now raises ImportError
    calls: list[object] = []
    monkeypatch.setattr(IPython.display, "display", calls.append)
    return calls


def test_without_myst_nb_a_hidden_number_stays_hidden_and_a_shown_one_shows(shown: list[object]) -> None:
    glue("hidden", 1.5, display=False)
    glue("visible", 2.5)
    assert shown == [2.5]


def test_without_myst_nb_a_figure_is_shown_even_when_glued_for_a_caption(shown: list[object]) -> None:
    fig, _ = plt.subplots()
    glue("fig-x", fig, display=False)
    plt.close(fig)
    assert shown == [fig]
