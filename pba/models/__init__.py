"""Models built from :mod:`pba.attention` layers, one file per model.

:mod:`pba.models.imdb`
    :class:`IMDBClassifier`, the paper's text classifier (post-LN encoder, mean pooling).
"""

from .imdb import EncoderBlock, IMDBClassifier

__all__ = ["EncoderBlock", "IMDBClassifier"]
