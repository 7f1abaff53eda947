"""Keras 3 versions of the four attention layers (optional: ``pip install "pay-better-attention[keras]"``).

Backend-agnostic (``keras.ops`` only): set ``KERAS_BACKEND`` to ``tensorflow``, ``jax`` or ``torch``
before importing Keras. ``import pba`` never imports Keras; ``import pba.keras`` does.
"""

from .layers import EfficientAttention, OptimisedAttention, StandardAttention, SuperAttention, make_attention
from .models import EncoderBlock, MaskedMeanPooling, TokenAndPositionEmbedding, build_imdb_classifier
from .transfer import copy_keras_to_torch, copy_torch_to_keras

__all__ = [
    "StandardAttention",
    "OptimisedAttention",
    "EfficientAttention",
    "SuperAttention",
    "make_attention",
    "copy_torch_to_keras",
    "copy_keras_to_torch",
    "TokenAndPositionEmbedding",
    "EncoderBlock",
    "MaskedMeanPooling",
    "build_imdb_classifier",
]
