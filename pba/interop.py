"""``pba`` layers and ``torch.nn.MultiheadAttention``: conversion both ways, and a drop-in adapter.

* :func:`from_torch`: an ``nn.MultiheadAttention`` -> a :class:`~pba.attention.StandardAttention`
  computing the same function.
* :func:`to_torch`: a standard, optimised or efficient layer -> an ``nn.MultiheadAttention``
  computing the same function. Optimised and efficient attention are standard attention with
  ``W^V = I`` (and ``W^K = I``) and zero biases there, so ``nn.MultiheadAttention`` represents them
  exactly; super attention's ``W^A`` has no counterpart, and neither has ``softmax_over="queries"``.
* :class:`MultiheadAttentionAdapter`: any ``pba`` layer behind ``nn.MultiheadAttention``'s call
  signature, to put it where torch code expects one (``nn.TransformerEncoderLayer.self_attn``, or an
  existing model's attention)::

      layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, batch_first=True)
      layer.self_attn = pba.MultiheadAttentionAdapter(
          pba.make_attention("super", 64, 4, context_length=128), batch_first=layer.self_attn.batch_first
      )
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import StandardAttention, SuperAttention

__all__ = ["from_torch", "to_torch", "MultiheadAttentionAdapter"]


def from_torch(mha: nn.MultiheadAttention) -> StandardAttention:
    """A :class:`~pba.attention.StandardAttention` with the weights (and training mode) of ``mha``.

    The result is batch-first whatever ``mha.batch_first`` says (the weights do not depend on it).
    Refused, with a ``ValueError`` naming the option: ``kdim``/``vdim`` different from
    ``embed_dim``, ``add_bias_kv=True`` and ``add_zero_attn=True``, which add keys the ``pba`` layers
    do not have.
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim:
        raise ValueError(
            "mha must have kdim == vdim == embed_dim (one packed in_proj_weight), got "
            f"embed_dim={mha.embed_dim}, kdim={mha.kdim}, vdim={mha.vdim}"
        )
    if mha.bias_k is not None:
        raise ValueError("mha must have add_bias_kv=False: the pba layers have no learned extra key/value")
    if mha.add_zero_attn:
        raise ValueError("mha must have add_zero_attn=False: the pba layers have no extra zero key/value")
    weight = mha.in_proj_weight  # rows: W^Q, W^K, W^V, each (embed_dim, embed_dim)
    layer = StandardAttention(
        mha.embed_dim,
        mha.num_heads,
        bias=mha.in_proj_bias is not None,
        dropout=mha.dropout,
        device=weight.device,
        dtype=weight.dtype,
    )
    d = mha.embed_dim
    with torch.no_grad():
        for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
            assert proj is not None
            proj.weight.copy_(weight[i * d : (i + 1) * d])
            if proj.bias is not None:
                proj.bias.copy_(mha.in_proj_bias[i * d : (i + 1) * d])
        layer.out_proj.weight.copy_(mha.out_proj.weight)
        if layer.out_proj.bias is not None:
            layer.out_proj.bias.copy_(mha.out_proj.bias)
    return layer.train(mha.training)


def to_torch(layer: StandardAttention, *, batch_first: bool = True) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` computing what ``layer`` computes (in the same training mode).

    A map the variant does not learn becomes the identity with a zero bias (keys and values are
    ``X`` itself). Refused with a ``ValueError``: super attention (``W^A`` mixes tokens before
    attention) and ``softmax_over="queries"``. Call the result with torch's conventions
    (``need_weights`` defaults to ``True`` there, and it averages weights over heads).
    """
    if not isinstance(layer, StandardAttention):
        raise TypeError(f"layer must be a pba attention layer, got {type(layer).__name__}")
    if isinstance(layer, SuperAttention):
        raise ValueError(
            "layer must be standard, optimised or efficient attention, got SuperAttention: its W^A "
            "mixes value rows across tokens, which torch.nn.MultiheadAttention cannot represent"
        )
    if layer.softmax_over != "keys":
        raise ValueError(
            "layer must normalise over keys (softmax_over='keys'), got softmax_over="
            f"{layer.softmax_over!r}, which torch.nn.MultiheadAttention cannot represent"
        )
    weight = layer.q_proj.weight
    d = layer.d_model
    mha = nn.MultiheadAttention(
        d,
        layer.n_heads,
        dropout=layer.dropout,
        bias=layer.bias,
        batch_first=batch_first,
        device=weight.device,
        dtype=weight.dtype,
    )
    identity = torch.eye(d, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
            rows = slice(i * d, (i + 1) * d)
            mha.in_proj_weight[rows] = identity if proj is None else proj.weight
            if mha.in_proj_bias is not None:
                mha.in_proj_bias[rows] = 0.0 if proj is None else proj.bias
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha.train(layer.training)


class MultiheadAttentionAdapter(nn.Module):
    """A ``pba`` layer behind ``nn.MultiheadAttention``'s ``forward`` and return value.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)`` as torch
    does, with torch's mask meanings (which the ``pba`` layers share) and torch's 3-D
    ``attn_mask`` of shape ``(B * n_heads, L_q, L_k)``. ``batch_first`` has no default: give the
    value of the module it replaces (``nn.TransformerEncoderLayer``'s own default is ``False``,
    inputs ``(L, B, d_model)``); a wrong value would silently attend across the batch.

    ``is_causal`` is passed on to the layer, which builds the causal mask itself (torch treats the
    flag as a hint about ``attn_mask``). For super attention it is also what makes ``W^A``
    triangular: give ``is_causal=True`` to a causal model, not only a causal ``attn_mask``.

    Differences from torch: the returned weights are taken before attention dropout, and the
    parameters are the layer's (``layer.q_proj.weight``...), so a checkpoint of an
    ``nn.MultiheadAttention`` does not load into it; convert one with :func:`from_torch` first.

    The attributes ``in_proj_weight``, ``in_proj_bias`` (``None``) and ``_qkv_same_embed_dim``
    (``False``) tell ``nn.TransformerEncoderLayer`` that its fused inference fast path, which reads
    ``nn.MultiheadAttention``'s packed weights, does not apply.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, layer: StandardAttention, *, batch_first: bool) -> None:
        super().__init__()
        if not isinstance(layer, StandardAttention):
            raise TypeError(f"layer must be a pba attention layer, got {type(layer).__name__}")
        self.layer = layer
        self.batch_first = bool(batch_first)
        self.embed_dim = layer.d_model
        self.num_heads = layer.n_heads

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if batched and not self.batch_first:  # (L, B, d) -> (B, L, d)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if attn_mask is not None and attn_mask.dim() == 3 and batched:  # (B*h, L_q, L_k)
            attn_mask = attn_mask.view(-1, self.num_heads, *attn_mask.shape[1:])
        result = self.layer(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            need_weights=need_weights,
        )
        out, weights = result if need_weights else (result, None)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=-3)  # over heads
        return out, weights

