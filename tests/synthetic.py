"""A tiny IMDB look-alike written as Parquet in the Hub's layout, for end-to-end tests."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "actors", "film", "story", "it", "this", "of"]


def review(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
    cue = rng.choice(POSITIVE if label else NEGATIVE)
    for _ in range(3):
        words.insert(rng.randrange(len(words) + 1), cue)
    return " ".join(words).capitalize() + ".<br /><br />The end!"


def write_imdb_like(directory: Path, n_train: int = 400, n_test: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 2 for i in range(n)]
        table = pa.table({"text": [review(rng, y) for y in labels], "label": pa.array(labels, pa.int64())})
        pq.write_table(table, directory / f"{split}-00000-of-00001.parquet")
    return directory
