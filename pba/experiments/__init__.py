"""Experiments from the command line: ``python -m pba.experiments imdb ...``.

:mod:`pba.experiments.imdb` runs grids of IMDB runs into a resumable JSON file;
:mod:`pba.experiments.summary` turns that file into a table, statistics and figures.
"""

from .imdb import QUIRKS, ImdbSettings, run_grid, run_one, run_stack
from .summary import load_results, summarise

__all__ = ["QUIRKS", "ImdbSettings", "run_grid", "run_one", "run_stack", "summarise", "load_results"]
