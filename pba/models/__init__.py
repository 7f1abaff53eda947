"""Models built from :mod:`pba.attention` layers, one file per model.

:mod:`pba.models.imdb`
    :class:`~pba.models.imdb.IMDBClassifier`, the paper's text classifier (post-LN encoder, mean pooling).
:mod:`pba.models.gpt`
    :class:`~pba.models.gpt.GPT`, a character-level decoder (pre-LN, causal attention), and :func:`~pba.models.gpt.generate`.
:mod:`pba.models.vit`
    :class:`~pba.models.vit.ViT`, a small Vision Transformer over non-overlapping patches.
"""

from .gpt import GPT, GPTArchitecture, GPTBlock, GPTConfig, generate
from .imdb import EncoderBlock, IMDBClassifier
from .vit import ViT, ViTArchitecture, ViTBlock, ViTConfig, patchify, unpatchify

__all__ = [
    "EncoderBlock",
    "IMDBClassifier",
    "GPT",
    "GPTArchitecture",
    "GPTBlock",
    "GPTConfig",
    "generate",
    "ViT",
    "ViTArchitecture",
    "ViTBlock",
    "ViTConfig",
    "patchify",
    "unpatchify",
]
