"""Argument checks shared by the models, the training loop and the experiments."""

from __future__ import annotations


def check_positive_int(name: str, value: object) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an ``int`` (not a ``bool``) above zero."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
