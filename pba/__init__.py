"""pba: the attention variants of "You Need to Pay Better Attention" (Hosseini & Hosseini, 2024).

>>> import torch, pba
>>> attn = pba.make_attention("super", d_model=32, n_heads=4, context_length=32)
>>> attn(torch.randn(2, 32, 32)).shape
torch.Size([2, 32, 32])

Submodules: :mod:`pba.attention` (the layers), :mod:`pba.costs` (parameter and multiply-add
formulas), :mod:`pba.data` (IMDB), :mod:`pba.models` (the classifier), :mod:`pba.train`,
:mod:`pba.interop` (``torch.nn.MultiheadAttention`` both ways), :mod:`pba.experiments` (command line) and, with Keras 3 installed, :mod:`pba.keras`.
"""

from . import costs, data, models, train
from .attention import (
    VARIANTS,
    EfficientAttention,
    KVCache,
    OptimisedAttention,
    StandardAttention,
    SuperAttention,
    make_attention,
)
from .interop import MultiheadAttentionAdapter, from_torch, to_torch

__version__ = "0.3.0"

__all__ = [
    "VARIANTS",
    "StandardAttention",
    "OptimisedAttention",
    "EfficientAttention",
    "SuperAttention",
    "make_attention",
    "KVCache",
    "from_torch",
    "to_torch",
    "MultiheadAttentionAdapter",
    "costs",
    "data",
    "models",
    "train",
]
