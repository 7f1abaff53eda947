"""What the book's chapters need from a notebook, wherever they run.

:func:`glue` stores a value for the book's text when the book is being built (``myst_nb`` is there),
and otherwise (Colab, plain Jupyter) shows it, or does nothing when asked not to display it. A
figure is shown there in any case: in the book its caption and number come from the
``{glue:figure}`` that places it, and without the book the reader still wants to see it. So a
chapter runs the same cells in the built book, in CI and on Colab.
"""

from __future__ import annotations

__all__ = ["glue"]


def glue(name: str, value: object, display: bool = True) -> None:
    """``myst_nb.glue(name, value, display)`` where myst_nb is installed; else display ``value``.

    In the built book, ``{glue:text}`name``` in the prose shows the value, so the text cannot
    disagree with the run that produced it.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display or _is_figure(value):
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)


def _is_figure(value: object) -> bool:
    """Whether ``value`` is a matplotlib figure (without importing matplotlib)."""
    return any(f"{c.__module__}.{c.__name__}" == "matplotlib.figure.Figure" for c in type(value).__mro__)
