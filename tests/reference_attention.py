"""An independent reference for the four attention variants, written from the paper's equations.

Nothing here comes from :mod:`pba.attention`: one sequence and one head at a time, in plain loops,
with 2-D matrices, ``@`` and ``torch.softmax`` only. The layer gives its weights (read by name from
its ``state_dict``) and its options (``n_heads``, ``softmax_over``, ``wa_sharing``); which maps a
variant learns is written here again, from the paper (arXiv:2403.01643):

* standard:  ``S_i = softmax(X W_i^Q (X W_i^K)^T / sqrt(d_k))``, ``H_i = S_i X W_i^V``;
* optimised: values are the column slice ``X_i``: ``H_i = S_i X_i``;
* efficient: keys are ``X_i`` too: ``S_i = softmax(X W_i^Q X_i^T / sqrt(d_k))``;
* super:     efficient with ``H_i = S_i (W^A X_i)``;
* every one: ``O = sum_i H_i W_i^O + b^O``, ``W_i^O`` the rows ``i d_k .. (i+1) d_k`` of ``W^O``.

``nn.Linear`` stores ``W^T``, so in the row convention ``X W_i^Q + b_i^Q`` is
``X @ weight[i d_k:(i+1) d_k].T + bias[i d_k:(i+1) d_k]``.

Masks are applied by leaving entries out, not by filling them: a query's weights are a softmax over
the keys it may see (or, with ``softmax_over="queries"``, a key's weights are a softmax over the
queries that may see it), and a head's output row sums only over those keys, so nothing held in a
padded token is ever read. A query that may see no key gets a zero row, and so the output ``b^O``.
Super attention's ``W^A`` mixes the real tokens' rows only (``W^A[:, real] X_i[real]``: the paper's
zero rows for padding), lower-triangular when causal.

Mask meanings are torch's (``nn.MultiheadAttention``): ``key_padding_mask`` ``(B, L_k)`` is ``True``
at padding; ``attn_mask`` ``(L_q, L_k)`` is bool, ``True`` at a forbidden pair, or float, added to
the scores (``-inf``: forbidden). Causal queries are the last ``L_q`` positions of the keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["reference_attention"]

#: which maps each variant learns, from the paper (not from pba)
LEARNS = {
    "standard": {"keys": True, "values": True, "mixing": False},
    "optimised": {"keys": True, "values": False, "mixing": False},
    "efficient": {"keys": False, "values": False, "mixing": False},
    "super": {"keys": False, "values": False, "mixing": True},
}


def _head_map(weights: dict[str, Tensor], name: str, x: Tensor, cols: slice) -> Tensor:
    """``X W_i + b_i`` for the learned map ``name`` (``q_proj``, ``k_proj``, ``v_proj``), head columns ``cols``."""
    out = x @ weights[f"{name}.weight"][cols].T
    bias = weights.get(f"{name}.bias")
    return out if bias is None else out + bias[cols]


def _weights(scores: Tensor, allowed: Tensor, over_queries: bool) -> Tensor:
    """Softmax of ``scores`` (``L_q x L_k``) over the allowed entries of each row (or column); zero elsewhere."""
    probs = torch.zeros_like(scores)
    if over_queries:
        for j in range(scores.shape[1]):
            rows = allowed[:, j].nonzero().flatten()
            if len(rows):
                probs[rows, j] = torch.softmax(scores[rows, j], dim=0)
    else:
        for t in range(scores.shape[0]):
            cols = allowed[t].nonzero().flatten()
            if len(cols):
                probs[t, cols] = torch.softmax(scores[t, cols], dim=0)
    return probs


def reference_attention(
    layer: nn.Module,
    variant: str,
    query: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """What ``layer`` (a ``variant`` layer in eval mode) should return, computed head by head."""
    learns = LEARNS[variant]
    weights = dict(layer.state_dict())
    n_heads, over_queries = layer.n_heads, layer.softmax_over == "queries"
    key = query if key is None else key
    value = key if value is None else value
    batch, len_q, d_model = query.shape
    len_k = key.shape[1]
    d_k = d_model // n_heads
    outputs = []
    for b in range(batch):
        x_q, x_k, x_v = query[b], key[b], value[b]
        real = torch.ones(len_k, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[b]
        allowed = real[None, :].expand(len_q, len_k).clone()
        added = torch.zeros(len_q, len_k, dtype=query.dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            allowed &= ~attn_mask
        elif attn_mask is not None:
            allowed &= attn_mask != float("-inf")
            added = torch.where(allowed, attn_mask, 0.0).to(query.dtype)
        if is_causal:  # query t is position t + L_k - L_q
            for t in range(len_q):
                allowed[t, t + len_k - len_q + 1 :] = False
        out = weights["out_proj.bias"].clone() if "out_proj.bias" in weights else torch.zeros(d_model, dtype=query.dtype)
        out = out.expand(len_q, d_model).clone()
        for i in range(n_heads):
            cols = slice(i * d_k, (i + 1) * d_k)
            q = _head_map(weights, "q_proj", x_q, cols)  # X W_i^Q
            k = _head_map(weights, "k_proj", x_k, cols) if learns["keys"] else x_k[:, cols]  # X W_i^K or X_i
            v = _head_map(weights, "v_proj", x_v, cols) if learns["values"] else x_v[:, cols]  # X W_i^V or X_i
            if learns["mixing"]:
                per_head = layer.wa_sharing == "head"
                wa = (weights["wa_weight"][i] if per_head else weights["wa_weight"])[:len_k, :len_k]
                if is_causal:  # value row j mixes rows <= j
                    wa = torch.stack([torch.where(torch.arange(len_k) <= j, wa[j], 0.0) for j in range(len_k)])
                real_rows = real.nonzero().flatten()
                v = wa[:, real_rows] @ v[real_rows]  # W^A X_i over the real tokens
                if "wa_bias" in weights:
                    v = v + (weights["wa_bias"][i] if per_head else weights["wa_bias"])[:len_k, None]
            probs = _weights(q @ k.T / math.sqrt(d_k) + added, allowed, over_queries)  # S_i
            head = torch.zeros(len_q, d_k, dtype=query.dtype)
            for t in range(len_q):
                seen = allowed[t].nonzero().flatten()
                head[t] = probs[t, seen] @ v[seen]  # (S_i V_i)[t], reading allowed keys only
            w_o = weights["out_proj.weight"][:, cols].T  # W_i^O: rows i d_k .. (i+1) d_k of W^O
            out = out + head @ w_o
        outputs.append(out)
    return torch.stack(outputs)
