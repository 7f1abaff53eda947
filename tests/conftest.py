"""Shared fixtures. Tests run on CPU in float32 unless they say otherwise."""

from __future__ import annotations

import os
from pathlib import Path

# In-process Keras tests use the torch backend; tests/test_keras_backends.py runs the Keras suite
# on TensorFlow, JAX and torch, each in a process of its own.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _data_dir(variable: str, what: str, needed: str | None = None) -> Path:
    """The directory named by ``variable``, or skip the test saying how to provide it."""
    value = os.environ.get(variable)
    if not value or not Path(value).is_dir() or (needed and not (Path(value) / needed).is_file()):
        pytest.skip(f"{what} not available: set {variable} to the directory of its files")
    return Path(value)


@pytest.fixture
def imdb_dir() -> Path:
    """The local IMDB Parquet directory (``PBA_IMDB_DIR``)."""
    return _data_dir("PBA_IMDB_DIR", "real IMDB data")


@pytest.fixture
def shakespeare_dir() -> Path:
    """The directory holding Tiny Shakespeare's ``input.txt`` (``PBA_SHAKESPEARE_DIR``)."""
    return _data_dir("PBA_SHAKESPEARE_DIR", "Tiny Shakespeare", "input.txt")


@pytest.fixture
def mnist_dir() -> Path:
    """The directory of MNIST's IDX files (``PBA_MNIST_DIR``)."""
    return _data_dir("PBA_MNIST_DIR", "MNIST")
