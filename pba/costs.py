"""Parameter counts and multiply-adds of one attention layer, as formulas.

Conventions (the book's cost chapter derives them): self-attention over one sequence, or
cross-attention from ``query_length`` queries to ``key_length`` keys; a multiply-add (MAC) is one
``a*b + c``; softmax, scaling, biases and dropout are not counted (they are ``O(l^2 h)`` or
``O(l d)``, lower order). With ``d = d_model``, ``l = length``:

=========  =========================  ==================================
variant    weights (no biases)        MACs (self-attention)
=========  =========================  ==================================
standard   ``4 d^2``                  ``4 l d^2 + 2 l^2 d``
optimised  ``3 d^2``                  ``3 l d^2 + 2 l^2 d``
efficient  ``2 d^2``                  ``2 l d^2 + 2 l^2 d``
super      ``2 d^2 + l^2``            ``2 l d^2 + 3 l^2 d``
=========  =========================  ==================================

Which maps each variant learns is not written here: it is read from the layer classes through
:func:`pba.attention.learned_projections`.
"""

from __future__ import annotations

from torch import nn

from ._checks import check_positive_int
from .attention import VARIANTS, learned_projections

__all__ = ["parameter_count", "macs", "count_parameters"]

_SQUARE = ("q", "k", "v", "o")  # the d_model x d_model maps; "a" (W^A) is l x l
_ON_KEYS = ("k", "v")  # applied to the L_k keys/values; "q" and "o" to the L_q queries


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def parameter_count(
    variant: str,
    d_model: int,
    *,
    n_heads: int = 1,
    context_length: int | None = None,
    bias: bool = True,
    wa_bias: bool = False,
    wa_sharing: str = "layer",
) -> int:
    """Parameters of one layer: ``p (d^2 + d [bias])`` plus, for super, ``W^A``.

    ``W^A`` adds ``l^2`` (``+ l`` with ``wa_bias``), times ``n_heads`` when ``wa_sharing="head"``.
    """
    _check_variant(variant)
    check_positive_int("d_model", d_model)
    check_positive_int("n_heads", n_heads)
    learned = learned_projections(variant)
    p = sum(name in _SQUARE for name in learned)
    count = p * (d_model * d_model + (d_model if bias else 0))
    if "a" in learned:
        if context_length is None:
            raise ValueError("super attention needs context_length to count W^A")
        check_positive_int("context_length", context_length)
        if wa_sharing not in ("layer", "head"):
            raise ValueError(f"wa_sharing must be one of ('layer', 'head'), got {wa_sharing!r}")
        copies = n_heads if wa_sharing == "head" else 1
        count += copies * (context_length**2 + (context_length if wa_bias else 0))
    return count


def macs(variant: str, d_model: int, length: int, *, key_length: int | None = None) -> int:
    """Multiply-adds of one layer for one sequence (``key_length`` defaults to ``length``).

    Projections cost ``L d^2`` each (``W^Q`` and ``W^O`` on the queries, ``W^K`` and ``W^V`` on the
    keys); scores and the weighted sum cost ``L_q L_k d`` each, summed over heads; super's
    ``W^A X`` costs ``L_k^2 d`` whether ``W^A`` is shared or per head.
    """
    _check_variant(variant)
    check_positive_int("d_model", d_model)
    check_positive_int("length", length)
    len_q, len_k = length, length if key_length is None else key_length
    check_positive_int("key_length", len_k)
    d = d_model
    learned = learned_projections(variant)
    projections = sum((len_k if name in _ON_KEYS else len_q) * d * d for name in learned if name in _SQUARE)
    attention = 2 * len_q * len_k * d  # S = QK^T and S V
    mixing = len_k * len_k * d if "a" in learned else 0  # W^A X
    return projections + attention + mixing


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """The number of (trainable) parameters a module actually holds."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
