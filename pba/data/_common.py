"""Helpers every data loader shares: the offline switch and the cache directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "OFFLINE_ENVS", "offline", "cache_dir"]

#: environment variable naming the cache directory (encoded splits, downloaded files)
CACHE_DIR_ENV = "PBA_CACHE_DIR"
#: environment variables that, set to 1/true/yes/on, forbid every download (Hugging Face's own)
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for no network access."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS
    )


def cache_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """``directory`` if given, else ``$PBA_CACHE_DIR``, else ``~/.cache/pba``."""
    if directory is not None:
        return Path(directory).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path.home() / ".cache" / "pba"
