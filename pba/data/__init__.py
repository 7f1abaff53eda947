"""Data for the book's tasks, each loaded from the Hub (online) or a local directory (offline).

:mod:`pba.data.imdb`
    IMDB reviews, tokenised under the paper's two protocols (text classification).

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
]
