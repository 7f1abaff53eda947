"""Data for the book's tasks, each loaded from the Hub (online) or a local directory (offline).

:mod:`pba.data.imdb`
    IMDB reviews, tokenised under the paper's two protocols (text classification).
:mod:`pba.data.shakespeare`
    Tiny Shakespeare as character ids (language modelling).
:mod:`pba.data.mnist`
    MNIST's 70,000 digits from the original IDX files, with a seeded validation split (vision).

Every loader takes a ``data_dir`` argument, falls back to an environment variable, and fails with
a message naming both when neither is set and the machine is offline.
"""

from . import imdb, mnist, shakespeare
from .imdb import *  # noqa: F403 (the names imdb.__all__ lists)
from .mnist import *  # noqa: F403
from .shakespeare import *  # noqa: F403

__all__ = [*imdb.__all__, *shakespeare.__all__, *mnist.__all__]
