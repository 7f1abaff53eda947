"""Shared fixtures. Tests run on CPU in float32 unless they say otherwise."""

from __future__ import annotations

import os
from pathlib import Path

# Keras runs on the torch backend in the tests, so CI needs no TensorFlow or JAX.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def imdb_dir() -> Path:
    """The local IMDB Parquet directory named by ``PBA_IMDB_DIR``; skip when it is not set."""
    value = os.environ.get("PBA_IMDB_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("real IMDB data not available: set PBA_IMDB_DIR to a directory of Parquet files")
    return Path(value)
