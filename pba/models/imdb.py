"""The IMDB classifier of the paper's text-classification experiment, with any attention variant.

Token + learned position embedding -> ``n_blocks`` post-LN encoder blocks
``LN(x + Dropout(MHA(x)))``, ``LN(z + Dropout(FFN(z)))`` -> mean over tokens -> Dropout ->
Dense(6, ReLU) -> Dropout -> Dense(1), a logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..attention import make_attention

__all__ = ["EncoderBlock", "IMDBClassifier"]


class EncoderBlock(nn.Module):
    """A post-LN transformer encoder block whose attention is one of :data:`pba.VARIANTS`."""

    def __init__(
        self,
        variant: str,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        context_length: int,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-6,
        **attention_options: object,
    ) -> None:
        super().__init__()
        self.attention = make_attention(
            variant, d_model, n_heads, context_length=context_length, **attention_options
        )
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``; ``key_padding_mask`` is ``True`` at padding."""
        z = self.norm1(x + self.dropout1(self.attention(x, key_padding_mask=key_padding_mask)))
        return self.norm2(z + self.dropout2(self.ffn(z)))


class IMDBClassifier(nn.Module):
    """Sentiment classifier: token ids ``(B, L)`` -> one logit per review ``(B,)``.

    Args:
        variant: the attention variant, one of :data:`pba.VARIANTS`.
        vocab_size: rows of the token embedding (20,000 in the paper).
        context_length: ``l``, the fixed input length (32); also super attention's ``W^A`` size.
        d_model, n_heads, d_ff, n_blocks, dropout: the architecture (32, 4, 32, 1, 0.1).
        pad_id: the token id of padding.
        padding_mask: pass ``ids == pad_id`` to attention as the key padding mask (default). The
            reference reimplementation used none (``False``), so its padded tokens were attended to.
        masked_pooling: average only over real tokens (default). ``False`` averages over all ``l``
            positions, padding included, as the reference did.
        attention_options: passed to :func:`pba.attention.make_attention` (``softmax_over``, ``wa_bias``,
            ``wa_sharing``, ``bias``, ``fused``...).
    """

    def __init__(
        self,
        variant: str,
        *,
        vocab_size: int = 20_000,
        context_length: int = 32,
        d_model: int = 32,
        n_heads: int = 4,
        d_ff: int = 32,
        n_blocks: int = 1,
        dropout: float = 0.1,
        pad_id: int = 0,
        padding_mask: bool = True,
        masked_pooling: bool = True,
        **attention_options: object,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_blocks", n_blocks), ("d_ff", d_ff)):
            check_positive_int(name, value)
        self.context_length = context_length
        self.pad_id = pad_id
        self.padding_mask = padding_mask
        self.masked_pooling = masked_pooling
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                variant,
                d_model,
                n_heads,
                d_ff,
                context_length=context_length,
                dropout=dropout,
                **attention_options,
            )
            for _ in range(n_blocks)
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(d_model, 6),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(6, 1),
        )

    def check_ids(self, ids: Tensor) -> None:
        """Raise a ``ValueError`` unless ``ids`` is an integer ``(B, L)`` tensor with ``L <= context_length``."""
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor (batch, length), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"ids must have at most context_length={self.context_length} tokens, got {ids.shape[1]}"
            )

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids ``(B, L)`` with ``L <= context_length`` -> logits ``(B,)``."""
        self.check_ids(ids)
        real = ids != self.pad_id  # (B, L)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, L, d_model)
        mask = ~real if self.padding_mask else None  # True at padding
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        if self.masked_pooling:
            weights = real.to(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = x.mean(1)
        return self.head(pooled).squeeze(-1)
