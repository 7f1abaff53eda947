"""Argument checks and dataclass helpers shared by the models, the training loop and the experiments."""

from __future__ import annotations

import dataclasses


def check_positive_int(name: str, value: object) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an ``int`` (not a ``bool``) above zero."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def fields_of(base: type, obj: object) -> dict[str, object]:
    """The values in ``obj`` of the dataclass ``base``'s fields (``obj`` may be of a subclass), by name."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(base)}
