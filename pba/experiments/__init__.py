"""Experiments from the command line: ``python -m pba.experiments {imdb,shakespeare,mnist} ...``.

:mod:`pba.experiments.grid` runs a grid of any experiment into a resumable JSON file;
:mod:`pba.experiments.imdb`, :mod:`~pba.experiments.shakespeare` and :mod:`~pba.experiments.mnist`
describe the three experiments (settings, data, one run); :mod:`pba.experiments.summary` turns a
results file into a table, statistics and figures.
"""

from .imdb import QUIRKS, ImdbSettings, run_grid, run_one, run_stack, train_one
from .mnist import MnistSettings
from .shakespeare import ShakespeareSettings
from .summary import compare, compare_means, load_results, summarise

__all__ = [
    "QUIRKS",
    "ImdbSettings",
    "ShakespeareSettings",
    "MnistSettings",
    "run_grid",
    "train_one",
    "run_one",
    "run_stack",
    "summarise",
    "compare",
    "compare_means",
    "load_results",
]
