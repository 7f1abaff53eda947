"""Run tests/keras_backend_suite.py on each Keras backend, each in its own process.

Keras reads ``KERAS_BACKEND`` once, at import, so one process cannot test three backends.
TensorFlow (Colab's default) and JAX are pinned in requirements.txt; where one is not installed,
its run is skipped and says so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "keras_backend_suite.py"


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_pba_keras_on_backend(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (requirements.txt pins it for CI)")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning", str(SUITE)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"pba.keras failed on the {backend} backend:\n{report}"
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], report
