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

from .imdb import (
    CACHE_DIR_ENV,
    IMDB_DIR_ENV,
    PROTOCOLS,
    EncodedSplits,
    IMDBText,
    Tokenizer,
    TokenizerConfig,
    clean_text,
    load_imdb,
    prepare_imdb,
)
from .mnist import MNIST_DIR_ENV, MNISTData, MNISTSplits, load_mnist, split_mnist
from .shakespeare import SHAKESPEARE_DIR_ENV, CharCorpus, load_shakespeare

__all__ = [
    "IMDB_DIR_ENV",
    "CACHE_DIR_ENV",
    "IMDBText",
    "TokenizerConfig",
    "Tokenizer",
    "EncodedSplits",
    "PROTOCOLS",
    "load_imdb",
    "prepare_imdb",
    "clean_text",
    "SHAKESPEARE_DIR_ENV",
    "CharCorpus",
    "load_shakespeare",
    "MNIST_DIR_ENV",
    "MNISTData",
    "MNISTSplits",
    "load_mnist",
    "split_mnist",
]
