"""Multi-head attention and the three variants of Hosseini & Hosseini (arXiv:2403.01643).

Notation (the book's notation page): tokens are rows, ``X`` is ``(L, d_model)``, ``h`` heads of
width ``d_k = d_model / h``, ``X_i`` the ``i``-th column slice of ``X`` (``d_k`` columns).

================  ======================================  =====================================
variant           scores of head ``i``                    values of head ``i``
================  ======================================  =====================================
standard          ``X W_i^Q (X W_i^K)^T / sqrt(d_k)``     ``X W_i^V``
optimised         ``X W_i^Q (X W_i^K)^T / sqrt(d_k)``     ``X_i``
efficient         ``X W_i^Q X_i^T / sqrt(d_k)``           ``X_i``
super             ``X W_i^Q X_i^T / sqrt(d_k)``           ``W^A X_i`` (``W^A`` is ``l x l``)
================  ======================================  =====================================

Every variant then computes ``O = [S_1 V_1, ..., S_h V_h] W^O`` with ``S_i = softmax(scores_i)``.

All four classes share :class:`StandardAttention`'s forward pass.  A variant only overrides the
hooks :meth:`~StandardAttention.project_key` and :meth:`~StandardAttention.project_value` (and
says which projections it learns), so the lines the paper changes are the only lines that differ.
Which maps a variant learns is recorded once, in the class attributes ``learns_keys``,
``learns_values`` and ``learns_token_mixing``; :func:`learned_projections` reads them for everything
else that needs to know (:mod:`pba.costs`, the Keras layers, the benchmarks).

Conversion to and from ``torch.nn.MultiheadAttention`` lives in :mod:`pba.interop`.

This module depends on ``torch`` alone: the layers can be lifted into any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VARIANTS",
    "KVCache",
    "StandardAttention",
    "OptimisedAttention",
    "EfficientAttention",
    "SuperAttention",
    "make_attention",
    "learned_projections",
    "PROJECTION_ATTRIBUTES",
    "split_heads",
    "merge_heads",
    "merge_projections",
]

VARIANTS: tuple[str, ...] = ("standard", "optimised", "efficient", "super")

SoftmaxOver = Literal["keys", "queries"]
WaSharing = Literal["layer", "head"]


@dataclass(eq=False)  # caches compare by identity: their tensors have no single truth value
class KVCache:
    """What one attention layer keeps between decoding steps (:meth:`StandardAttention.decode`).

    In causal self-attention the keys and values of earlier positions never change when a token is
    appended, so they are computed once. That holds for super attention too: ``W^A`` acts
    lower-triangular, so earlier value rows do not change. Each new value row
    ``sum_{m <= t} W^A[t, m] x_m`` mixes every earlier input, but super attention's keys are its
    inputs (``K_i = X_i``), so the cached keys serve for that as well.

    Attributes:
        keys, values: ``(B, h, t, d_k)``, every head's keys and values of the ``t`` positions so far.
        layer: the class name of the layer that filled the cache (a cache serves one layer).
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    layer: str | None = None

    @property
    def length(self) -> int:
        """``t``, the number of positions cached."""
        return 0 if self.keys is None else self.keys.shape[2]

    def __repr__(self) -> str:
        if self.keys is None:
            return "KVCache(empty)"
        return f"KVCache({self.layer}, length={self.length}, keys={tuple(self.keys.shape)}, dtype={self.keys.dtype})"


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """``(B, L, d_model) -> (B, h, L, d_k)``: head ``i`` sees columns ``i*d_k .. (i+1)*d_k``."""
    batch, length, d_model = x.shape
    return x.view(batch, length, n_heads, d_model // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, h, L, d_k) -> (B, L, h*d_k)``: the concatenation ``[H_1 ... H_h]``."""
    batch, n_heads, length, d_k = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_heads * d_k)


def _autocast_enabled(device_type: str) -> bool:
    """Whether :func:`torch.autocast` is on for ``device_type`` (torch < 2.4 knows CPU and CUDA only)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_layer_options(d_model: int, n_heads: int, dropout: float, softmax_over: str) -> None:
    """Validate the options every variant shares (used by the PyTorch and the Keras layers)."""
    _check_positive_int("d_model", d_model)
    _check_positive_int("n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(
            f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
        )
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    _check_choice("softmax_over", softmax_over, ("keys", "queries"))


_CAUSAL_NEEDS_KEYS = (
    "is_causal=True needs softmax_over='keys', got softmax_over='queries': "
    "normalising over queries mixes every query's score, so a token would read later ones"
)


class _Projection(nn.Linear):
    """An ``nn.Linear`` whose :meth:`reset_parameters` gives the attention layer's initialisation.

    ``weight_init="xavier"`` (``W^Q, W^K, W^V``): Xavier-uniform weight, as ``nn.MultiheadAttention``'s
    ``in_proj_weight``. ``weight_init="linear"`` (``W^O``): ``nn.Linear``'s default weight, as
    ``nn.MultiheadAttention``'s ``out_proj``. The bias is zero in both. Because the rule lives on the
    projection itself, any order of resetting (a model's ``apply``, or a loop over ``modules()``
    after ``to_empty``) ends with the layer's initialisation, not ``nn.Linear``'s.

    ``nn.Linear.__init__`` draws its own default first (``weight_init`` is still ``None`` then); the
    attention layer re-draws the Xavier weights afterwards. That is the random stream every seeded
    result in the book was made with.
    """

    weight_init: str | None = None

    def __init__(self, d_model: int, *, bias: bool, weight_init: str, **factory: object) -> None:
        super().__init__(d_model, d_model, bias=bias, **factory)
        self.weight_init = weight_init

    def reset_parameters(self) -> None:
        if self.weight_init is None:  # inside nn.Linear.__init__
            super().reset_parameters()
            return
        if self.weight_init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        else:
            super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class StandardAttention(nn.Module):
    r"""Multi-head scaled dot-product attention (Vaswani et al., 2017), batch-first.

    .. math::
        O = \sum_{i=1}^{h} \operatorname{softmax}\!\Big(\frac{X W_i^Q (X W_i^K)^\top}{\sqrt{d_k}}\Big)
            X W_i^V W_i^O

    Args:
        d_model: width of the inputs and outputs.
        n_heads: number of heads ``h``; must divide ``d_model``.
        bias: add a bias to every learned linear map (``W^Q, W^K, W^V, W^O``). Default ``True``,
            as the paper counts parameters.
        dropout: dropout probability on the attention weights (training mode only).
        softmax_over: ``"keys"`` (default, textbook: each query's weights sum to one) or
            ``"queries"`` (the reference reimplementation's ``softmax(dim=1)``, kept to reproduce it;
            it does not make outputs at real tokens independent of padded queries).
        fused: use :func:`torch.nn.functional.scaled_dot_product_attention` when possible. The fused
            path is taken when ``fused`` is true, ``need_weights`` is false and ``softmax_over`` is
            ``"keys"``; otherwise the explicit path, which materialises the scores, runs. Both give
            the same numbers.
        device, dtype: factory arguments for the parameters.

    Masks (the argument names and meanings of ``torch.nn.MultiheadAttention``):
        ``key_padding_mask`` ``(B, L_k)``: bool, ``True`` marks **padding** (a key no query may
        read), or float, added to every query's score for that key (``-inf`` = padding).
        ``attn_mask``, ``(L_q, L_k)`` or broadcastable to ``(B, h, L_q, L_k)`` with four dimensions
        (torch's 3-D ``(B * h, L_q, L_k)`` is refused as ambiguous;
        :class:`pba.interop.MultiheadAttentionAdapter` takes it): bool, ``True`` marks a
        **forbidden** query-key pair, or float, added to the scores. (``F.scaled_dot_product_attention`` reads a
        bool ``attn_mask`` the other way round; these layers follow ``nn.MultiheadAttention``, whose
        place they take, and both of whose bool masks mean "ignore".)
        ``is_causal=True`` lets query ``t`` read keys ``j <= t + L_k - L_q``: the queries are the
        last ``L_q`` positions of the keys' sequence (``L_q <= L_k``; ``L_q == L_k`` is the usual
        square mask, ``L_q = 1`` is decoding one token against its prefix).
        A query that may read no key at all gets all-zero attention weights, so its output is the
        output bias ``b^O`` (never NaN). Padded key and value rows are set to zero before any
        projection, so nothing they hold (not even NaN or inf, which a zero attention weight does not
        cancel) reaches a real token.

    Shapes: ``(B, L, d_model)``, or unbatched ``(L, d_model)`` with a ``(L_k,)`` padding mask.

    Inputs must have the parameters' dtype (a ``TypeError`` names the argument and both dtypes),
    except under :func:`torch.autocast`, which casts them.

    Initialisation: Xavier-uniform ``W^Q, W^K, W^V``, ``nn.Linear``'s default ``W^O``, zero biases
    (as ``nn.MultiheadAttention``). :meth:`reset_parameters` draws it again, so a layer built on the
    ``meta`` device can be materialised with ``to_empty`` and reset.

    Derivatives: every path gives reverse-mode gradients (``backward``, ``torch.func.grad``,
    ``vmap``). The explicit path (``fused=False``) also gives forward mode (``torch.func.jvp``) and
    double backward (gradient penalties, Hessian-vector products). On CPU the fused path runs torch's
    ``_scaled_dot_product_flash_attention_for_cpu``, which has no forward-mode rule and whose backward
    torch cannot differentiate: both raise a ``RuntimeError``. Use ``fused=False`` there, or keep
    ``fused=True`` and select torch's math kernel with
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.

    Tracing: the input checks are skipped under ``torch.jit.trace`` and become run-time assertions
    under ``torch.export``/``torch.compile`` with dynamic shapes, so a layer exports with a dynamic
    batch size and length (up to ``context_length`` for super attention).
    """

    #: whether the layer learns ``W^K`` (``False``: keys are the column slices ``X_i``)
    learns_keys: ClassVar[bool] = True
    #: whether the layer learns ``W^V`` (``False``: values are the column slices ``X_i``)
    learns_values: ClassVar[bool] = True
    #: whether the layer learns super attention's ``l x l`` token-mixing matrix ``W^A``
    learns_token_mixing: ClassVar[bool] = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        softmax_over: SoftmaxOver = "keys",
        fused: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_layer_options(d_model, n_heads, dropout, softmax_over)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.bias = bias
        self.dropout = float(dropout)
        self.softmax_over: SoftmaxOver = softmax_over
        self.fused = bool(fused)
        factory = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = _Projection(d_model, weight_init="xavier", **factory)  # W^Q
        self.k_proj = _Projection(d_model, weight_init="xavier", **factory) if self.learns_keys else None
        self.v_proj = _Projection(d_model, weight_init="xavier", **factory) if self.learns_values else None
        self.out_proj = _Projection(d_model, weight_init="linear", **factory)  # W^O
        for proj in (self.q_proj, self.k_proj, self.v_proj):  # nn.Linear drew its default: redraw
            if proj is not None:
                proj.reset_parameters()
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def reset_parameters(self) -> None:
        """Draw the layer's initialisation again (after ``to_empty``, or to restart training)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj is not None:
                proj.reset_parameters()

    # ----------------------------------------------------------------------------- hooks
    def project_query(self, query: Tensor) -> Tensor:
        """``Q = X W^Q``, ``(B, L_q, d_model)``; every variant learns it."""
        return self.q_proj(query)

    def project_key(self, key: Tensor) -> Tensor:
        """``K = X W^K`` (``(B, L_k, d_model)``)."""
        assert self.k_proj is not None
        return self.k_proj(key)

    def project_value(self, value: Tensor, is_causal: bool) -> Tensor:
        """``V = X W^V`` (``(B, L_k, d_model)``); padded rows of ``value`` are zero already.

        ``is_causal`` matters only to super attention, whose ``W^A`` then acts lower-triangular.
        """
        assert self.v_proj is not None
        return self.v_proj(value)

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` ``(B, L_q, d_model)`` to ``key``/``value`` ``(B, L_k, d_model)``.

        ``key`` and ``value`` default to ``query`` (self-attention). Returns the output
        ``(B, L_q, d_model)``, and with ``need_weights=True`` also the attention weights
        ``(B, h, L_q, L_k)`` (after the softmax, before dropout). Masks: see the class docstring.
        """
        self_attention = key is None or key is query  # then L_q == L_k, without reading a shape
        key = query if key is None else key
        value = key if value is None else value
        checks = not torch.jit.is_tracing()  # the tracer would record the checks' Python branches
        if checks:
            self._check_tensor("query", query, unbatched=False)
            for name, x in (("key", key), ("value", value)):
                self._check_tensor(name, x, unbatched=query.dim() == 2)
        unbatched = query.dim() == 2
        if unbatched:  # (L, d_model): a batch of one
            query, key, value = query[None], key[None], value[None]
            if isinstance(key_padding_mask, Tensor):
                key_padding_mask = key_padding_mask[None]
        if checks:
            self._check_inputs(query, key, value, key_padding_mask, attn_mask, is_causal)
        len_q, len_k = query.shape[1], key.shape[1]

        q = split_heads(self.project_query(query), self.n_heads)  # (B, h, L_q, d_k)
        if key_padding_mask is not None:
            # Padded rows must carry nothing. Their scores are masked, but a padded value row still
            # enters S V with weight 0 (0 * NaN = NaN), and the fused kernel adds the mask to the
            # scores (NaN - inf = NaN). Zeroed, they are harmless on both paths, and super
            # attention's W^A, which mixes value rows, mixes zeros into the real tokens. Each is
            # zeroed just before its own projection, which fixes the order in which autograd sums
            # the input's gradients (committed results depend on that order).
            padded = _padding(key_padding_mask)[..., None]  # (B, L_k, 1)
            key = key.masked_fill(padded, 0.0)
        k = split_heads(self.project_key(key), self.n_heads)  # (B, h, L_k, d_k)
        if key_padding_mask is not None:
            value = value.masked_fill(padded, 0.0)
        v = split_heads(self.project_value(value, is_causal), self.n_heads)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if self.fused and not need_weights and self.softmax_over == "keys":
            if (
                key_padding_mask is None
                and attn_mask is None
                and (not is_causal or self_attention or _known_equal(len_q, len_k))
            ):  # no mask, or a square causal one, which the kernel takes as a flag
                heads = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
            else:
                allowed, additive = _score_masks(key_padding_mask, attn_mask, is_causal, len_q, len_k, q.device)
                heads = self._fused_heads(q, k, v, allowed, additive, dropout_p)
        else:
            allowed, additive = _score_masks(key_padding_mask, attn_mask, is_causal, len_q, len_k, q.device)
            heads, weights = self._explicit_heads(q, k, v, allowed, additive, dropout_p)
        out = self.out_proj(merge_heads(heads))  # (B, L_q, d_model)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return (out, weights) if need_weights else out

    def decode(self, x: Tensor, cache: KVCache) -> Tensor:
        """Causal self-attention for ``x`` ``(B, n, d_model)``, the ``n`` tokens after those in ``cache``.

        Returns their outputs ``(B, n, d_model)``, equal up to rounding to the last ``n`` rows of
        ``forward(sequence, is_causal=True)`` on the whole sequence, and appends their keys and
        values to ``cache`` (an empty :class:`KVCache` starts a sequence). Each step projects only
        the new tokens, where ``forward`` would project every earlier token again.
        """
        if self.softmax_over != "keys":
            raise ValueError(_CAUSAL_NEEDS_KEYS)
        self._check_tensor("x", x, unbatched=False)
        self._check_cache(cache, x)
        start, n = cache.length, x.shape[1]
        q = split_heads(self.project_query(x), self.n_heads)  # (B, h, n, d_k)
        k = split_heads(self.project_key(x), self.n_heads)  # (B, h, n, d_k)
        if cache.keys is not None and (cache.keys.dtype != k.dtype or cache.keys.device != k.device):
            raise ValueError(
                f"cache holds {cache.keys.dtype} keys on {cache.keys.device}, but this call makes {k.dtype} on "
                f"{k.device}; decode a sequence with one dtype and device (or autocast setting) throughout"
            )
        keys = k if cache.keys is None else torch.cat((cache.keys, k), dim=2)  # (B, h, t + n, d_k)
        if self.learns_token_mixing:  # W^A mixes every earlier input into each new value row; the keys are the inputs
            v = split_heads(self.project_value_rows(merge_heads(keys), start), self.n_heads)  # type: ignore[attr-defined]
        else:
            v = split_heads(self.project_value(x, is_causal=True), self.n_heads)  # (B, h, n, d_k)
        values = v if cache.values is None else torch.cat((cache.values, v), dim=2)
        dropout_p = self.dropout if self.training else 0.0
        # The newest token alone reads every position so far (no mask); n new tokens are the last n
        # positions of the keys' sequence (for a prompt, start == 0, the square mask the kernel takes as a flag).
        if self.fused and (n == 1 or start == 0):
            heads = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p, is_causal=n > 1)
        else:
            allowed = None if n == 1 else _score_masks(None, None, True, n, start + n, q.device)[0]
            if self.fused:
                heads = self._fused_heads(q, keys, values, allowed, None, dropout_p)
            else:
                heads, _ = self._explicit_heads(q, keys, values, allowed, None, dropout_p)
        cache.keys, cache.values, cache.layer = keys, values, type(self).__name__  # only now: a failed call changes nothing
        return self.out_proj(merge_heads(heads))  # (B, n, d_model)

    def _check_cache(self, cache: KVCache, x: Tensor) -> None:
        """``cache`` must be empty or hold this layer's kind of keys and values for ``x``'s batch."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a pba.KVCache, got {type(cache).__name__}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one new token, got length 0")
        if cache.keys is None:
            return
        if cache.layer != type(self).__name__:
            raise ValueError(f"cache was filled by a {cache.layer}, not a {type(self).__name__}: each layer needs its own KVCache")
        keys, values = cache.keys, cache.values
        expected = (x.shape[0], self.n_heads, cache.length, self.d_k)
        if values is None or tuple(keys.shape) != expected or tuple(values.shape) != expected:
            got = (tuple(keys.shape), None if values is None else tuple(values.shape))
            raise ValueError(
                f"cache must hold keys and values of shape (batch, n_heads, t, d_k) = {expected} for x of batch "
                f"size {x.shape[0]}, got {got}"
            )

    def _explicit_heads(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        allowed: Tensor | None,
        additive: Tensor | None,
        dropout_p: float,
    ) -> tuple[Tensor, Tensor]:
        """Materialise the scores: readable, returns weights, supports every option."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, h, L_q, L_k)
        if additive is not None:
            scores = scores + additive.to(scores.dtype)
        axis = -1 if self.softmax_over == "keys" else -2
        if allowed is None:
            weights = torch.softmax(scores, dim=axis)
        else:
            # A row (keys) or column (queries) with nothing allowed would be softmax(-inf...) = NaN:
            # unmask it for the softmax, then zero its weights.
            empty = ~allowed.any(dim=axis, keepdim=True)
            scores = scores.masked_fill(~(allowed | empty), float("-inf"))
            weights = torch.softmax(scores, dim=axis).masked_fill(empty, 0.0)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        return dropped @ v, weights  # (B, h, L_q, d_k), (B, h, L_q, L_k)

    def _fused_heads(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        allowed: Tensor | None,
        additive: Tensor | None,
        dropout_p: float,
    ) -> Tensor:
        """The same heads through ``F.scaled_dot_product_attention`` (whose bool mask means "allowed")."""
        assert allowed is not None  # every mask, and a causal one that is not square, sets it
        empty = ~allowed.any(dim=-1, keepdim=True)  # queries that may read no key
        mask = allowed | empty
        if additive is not None:
            mask = torch.where(mask, additive.to(q.dtype), float("-inf"))
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return heads.masked_fill(empty, 0.0)

    # ----------------------------------------------------------------------------- checks
    def _check_tensor(self, name: str, x: Tensor, unbatched: bool) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        dtype = self.q_proj.weight.dtype
        if x.dtype != dtype and not _autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {x.dtype} but the layer's parameters have dtype {dtype}: "
                f"convert one to the other (e.g. {name}.to({dtype})) or run under torch.autocast"
            )
        if x.dim() not in ((2,) if unbatched else (2, 3) if name == "query" else (3,)) or (
            x.shape[-1] != self.d_model
        ):
            expected = (
                f"(length, d_model={self.d_model}), as query is unbatched"
                if unbatched
                else f"(batch, length, d_model={self.d_model})"
                + (f" or unbatched (length, d_model={self.d_model})" if name == "query" else "")
            )
            raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        for name, x in (("key", key), ("value", value)):
            _require(
                x.shape[0] == batch,
                lambda: ValueError(
                    "query, key and value must share the batch size, got "
                    f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}"
                ),
            )
        _require(
            value.shape[1] == len_k,
            lambda: ValueError(
                f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}"
            ),
        )
        if key_padding_mask is not None:
            _check_mask_dtype(
                "key_padding_mask", key_padding_mask, "True = padding, as in torch.nn.MultiheadAttention"
            )
            expected = (batch, len_k)
            wrong = lambda: ValueError(  # noqa: E731
                f"key_padding_mask must have shape (batch, L_k) = {tuple(int(n) for n in expected)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
            if key_padding_mask.dim() != 2:
                raise wrong()
            for got, want in zip(key_padding_mask.shape, expected):
                _require(got == want, wrong)
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask, "True = forbidden pair, as in torch.nn.MultiheadAttention")
            target = (batch, self.n_heads, len_q, len_k)
            wrong = lambda: ValueError(  # noqa: E731
                "attn_mask must be (L_q, L_k) or broadcastable to (batch, n_heads, L_q, L_k) = "
                f"{tuple(int(n) for n in target)}, got {tuple(attn_mask.shape)}"
                + (
                    " (a 3-D mask is ambiguous: nn.MultiheadAttention reads (batch * n_heads, L_q, L_k); "
                    "give it 4 dimensions, or use pba.MultiheadAttentionAdapter, which takes torch's layout)"
                    if attn_mask.dim() == 3
                    else ""
                )
            )
            if attn_mask.dim() not in (2, 4):
                raise wrong()
            for got, want in zip(reversed(attn_mask.shape), reversed(target)):
                if not (isinstance(got, int) and got == 1):  # a size-1 dimension broadcasts
                    _require(got == want, wrong)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        if is_causal and self.softmax_over == "queries":
            raise ValueError(_CAUSAL_NEEDS_KEYS)
        if is_causal:
            _require(
                len_q <= len_k,
                lambda: ValueError(
                    f"is_causal=True needs L_q <= L_k (the queries are the last L_q of the keys' "
                    f"positions), got L_q={len_q}, L_k={len_k}"
                ),
            )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, bias={self.bias}, "
            f"dropout={self.dropout}, softmax_over={self.softmax_over!r}, fused={self.fused}"
        )


def _known_equal(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """``a == b`` for plain ints; ``False`` for symbolic sizes (take the path that works for any)."""
    return isinstance(a, int) and isinstance(b, int) and a == b


def _require(ok: bool | torch.SymBool, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` unless ``ok``; a symbolic condition (``torch.compile``, ``torch.export``
    with dynamic shapes) becomes a run-time assertion instead of a guard that fixes the shape."""
    if isinstance(ok, torch.SymBool):
        torch._check(ok, lambda: str(error()))
    elif not ok:
        raise error()


def _check_mask_dtype(name: str, mask: object, meaning: str) -> None:
    if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor ({meaning}) or a float tensor added to the scores, got {got}")


def _padding(key_padding_mask: Tensor) -> Tensor:
    """Bool ``(B, L_k)``: ``True`` at padding (a bool mask itself; ``-inf`` entries of a float one)."""
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    return torch.isneginf(key_padding_mask)


def _score_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    len_q: int,
    len_k: int,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """Every mask as ``(allowed, additive)``, each broadcastable to ``(B, h, L_q, L_k)`` or ``None``.

    ``allowed`` is bool, ``True`` where query ``t`` may read key ``j``: it collects bool masks and the
    ``-inf`` entries of float ones. ``additive`` collects the finite entries of float masks.
    """
    masks = []  # (mask, where it goes in (B, h, L_q, L_k))
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])  # (B, 1, 1, L_k)
    if attn_mask is not None:
        masks.append(attn_mask)
    allowed = additive = None
    for mask in masks:
        blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
        allowed = ~blocked if allowed is None else allowed & ~blocked
        if mask.dtype != torch.bool:
            finite = mask.masked_fill(blocked, 0.0)
            additive = finite if additive is None else additive + finite
    if is_causal:  # query t sits at position t + L_k - L_q of the keys' sequence
        causal = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(len_k - len_q)
        allowed = causal if allowed is None else allowed & causal
    return allowed, additive


class OptimisedAttention(StandardAttention):
    r"""Optimised attention: no ``W^V``; head ``i`` takes the column slice ``X_i`` as its values.

    .. math:: H_i = \operatorname{softmax}\!\Big(\frac{X W_i^Q (X W_i^K)^\top}{\sqrt{d_k}}\Big) X_i

    ``X W_i^V W_i^O`` is a product of two linear maps; ``W^O`` alone learns their product.
    Exact for one head, a strict sub-family for several. Arguments as :class:`StandardAttention`.
    """

    learns_values = False

    def project_value(self, value: Tensor, is_causal: bool) -> Tensor:
        return value  # V = X: head i reads the slice X_i


class EfficientAttention(OptimisedAttention):
    r"""Efficient attention: no ``W^K`` either; keys are the column slices ``X_i`` too.

    .. math:: H_i = \operatorname{softmax}\!\Big(\frac{X W_i^Q X_i^\top}{\sqrt{d_k}}\Big) X_i

    ``W_i^Q (W_i^K)^\top`` is one bilinear form; ``W^Q`` alone learns it. Only ``W^Q`` and ``W^O``
    remain. Arguments as :class:`StandardAttention`.
    """

    learns_keys = False

    def project_key(self, key: Tensor) -> Tensor:
        return key  # K = X: head i compares against the slice X_i


class SuperAttention(EfficientAttention):
    r"""Super attention: efficient attention whose values are first mixed along the token axis.

    .. math:: H_i = \operatorname{softmax}\!\Big(\frac{X W_i^Q X_i^\top}{\sqrt{d_k}}\Big) (W^A X_i)

    ``W^A`` is a learned ``l x l`` matrix (``l = context_length``) that acts from the left. For
    inputs of length ``L_k < l`` the layer uses ``W^A[:L_k, :L_k]``, which equals right-padding to
    ``l`` and masking the padding; ``L_k > l`` is an error. Padded value rows (``key_padding_mask``
    true) are zero when ``W^A`` mixes them (the shared forward zeroes them first), so they never
    leak into real tokens.

    ``W^A`` mixes value rows before any score is computed, so only ``is_causal`` reaches it:
    with ``is_causal=True`` it acts lower-triangular and no token reads a later one (with
    ``L_q < L_k`` the outputs are the last ``L_q`` rows of the square causal computation over the
    keys). An ``attn_mask`` restricts the scores alone; ``W^A`` still mixes every unpadded row, so a
    causal ``attn_mask`` without ``is_causal=True`` does **not** make super attention causal.

    Args:
        context_length: ``l``, the fixed maximum length. Required.
        wa_sharing: ``"layer"`` (default, the paper: one ``W^A`` for all heads) or ``"head"`` (one
            per head, an option of the reference reimplementation).
        wa_bias: add a bias to ``W^A`` (one per token row). Default ``False`` (the paper's
            equations have none; the reference's PyTorch code had one).

    The other arguments are those of :class:`StandardAttention`.
    """

    learns_token_mixing = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        context_length: int | None = None,
        wa_sharing: WaSharing = "layer",
        wa_bias: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        softmax_over: SoftmaxOver = "keys",
        fused: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model,
            n_heads,
            bias=bias,
            dropout=dropout,
            softmax_over=softmax_over,
            fused=fused,
            device=device,
            dtype=dtype,
        )
        if context_length is None:
            raise ValueError("super attention needs context_length (the fixed length l of W^A)")
        self.context_length = _check_positive_int("context_length", context_length)
        self.wa_sharing: WaSharing = _check_choice(  # type: ignore[assignment]
            "wa_sharing", wa_sharing, ("layer", "head")
        )
        if not isinstance(wa_bias, bool):
            raise TypeError(f"wa_bias must be a bool, got {type(wa_bias).__name__}")
        copies = (n_heads,) if wa_sharing == "head" else ()
        factory = {"device": device, "dtype": dtype}
        self.wa_weight = nn.Parameter(torch.empty(*copies, context_length, context_length, **factory))
        self.wa_bias = nn.Parameter(torch.empty(*copies, context_length, **factory)) if wa_bias else None
        self._reset_token_mixing()

    def _reset_token_mixing(self) -> None:
        """Xavier-uniform ``W^A`` (each head's own with ``wa_sharing="head"``), as the reference; zero bias."""
        for wa in self.wa_weight.data.view(-1, self.context_length, self.context_length):
            nn.init.xavier_uniform_(wa)
        if self.wa_bias is not None:
            nn.init.zeros_(self.wa_bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_token_mixing()

    def effective_wa(self, length: int, is_causal: bool = False) -> Tensor:
        """``W^A[:L, :L]``, lower-triangular when causal: ``(L, L)`` or ``(h, L, L)``."""
        # A copy rather than the view wa_weight[..., :L, :L]: the view's layout depends on whether
        # L == l, which would fix L to one value under torch.export and torch.compile.
        rows = torch.arange(length, device=self.wa_weight.device)
        wa = self.wa_weight.index_select(-2, rows).index_select(-1, rows)
        return wa.tril() if is_causal else wa

    def project_value(self, value: Tensor, is_causal: bool) -> Tensor:
        return self._mix(value, self.effective_wa(value.shape[1], is_causal), first_row=0)

    def project_value_rows(self, inputs: Tensor, first_row: int) -> Tensor:
        """Rows ``first_row, ...`` of causal ``W^A X`` for ``X = inputs`` ``(B, L, d_model)`` (decoding)."""
        if inputs.shape[1] > self.context_length:
            raise ValueError(
                f"super attention decodes at most context_length={self.context_length} positions, "
                f"got {inputs.shape[1]}"
            )
        length = inputs.shape[1]
        wa = self.wa_weight[..., first_row:length, :length].tril(first_row)  # the causal rows asked for
        return self._mix(inputs, wa, first_row)

    def _mix(self, value: Tensor, wa: Tensor, first_row: int) -> Tensor:
        """``W^A X`` (plus the ``W^A`` bias) for the rows of ``wa``, which start at ``first_row``."""
        rows = slice(first_row, first_row + wa.shape[-2])
        if self.wa_sharing == "layer":
            mixed = wa @ value  # (L, L) @ (B, L, d_model): W^A X, all heads at once
            if self.wa_bias is not None:
                mixed = mixed + self.wa_bias[rows, None]
            return mixed
        heads = wa @ split_heads(value, self.n_heads)  # (h, L, L) @ (B, h, L, d_k): W^A_i X_i
        if self.wa_bias is not None:
            heads = heads + self.wa_bias[:, rows, None]
        return merge_heads(heads)

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        super()._check_inputs(query, key, value, key_padding_mask, attn_mask, is_causal)
        _require(
            key.shape[1] <= self.context_length,
            lambda: ValueError(
                f"super attention takes at most context_length={self.context_length} keys, "
                f"got L_k={key.shape[1]}"
            ),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, context_length={self.context_length}, "
            f"wa_sharing={self.wa_sharing!r}, wa_bias={self.wa_bias is not None}"
        )


_CLASSES: dict[str, type[StandardAttention]] = {
    "standard": StandardAttention,
    "optimised": OptimisedAttention,
    "efficient": EfficientAttention,
    "super": SuperAttention,
}


#: Letters of :func:`learned_projections` and the attribute holding each map's weight.
PROJECTION_ATTRIBUTES: dict[str, str] = {
    "q": "q_proj",  # W^Q, d_model x d_model
    "k": "k_proj",  # W^K, d_model x d_model
    "v": "v_proj",  # W^V, d_model x d_model
    "o": "out_proj",  # W^O, d_model x d_model
    "a": "wa_weight",  # W^A, l x l (one per head with wa_sharing="head")
}


def learned_projections(variant: str) -> tuple[str, ...]:
    """The maps ``variant`` learns, read from its class: a sub-tuple of ``("q", "k", "v", "o", "a")``.

    ``"q"``, ``"k"``, ``"v"``, ``"o"`` are the ``d_model x d_model`` maps ``W^Q, W^K, W^V, W^O`` and
    ``"a"`` is super attention's ``l x l`` ``W^A`` (:data:`PROJECTION_ATTRIBUTES` names the attribute
    holding each). The answer comes from the class attributes ``learns_keys``, ``learns_values``
    and ``learns_token_mixing``; :mod:`pba.costs`, the Keras layers and the benchmarks ask here
    rather than keep their own table.
    """
    if variant not in _CLASSES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cls = _CLASSES[variant]
    learned = {"q": True, "k": cls.learns_keys, "v": cls.learns_values, "o": True, "a": cls.learns_token_mixing}
    return tuple(name for name, learns in learned.items() if learns)


def make_attention(variant: str, d_model: int, n_heads: int, **options: object) -> StandardAttention:
    """Build one of :data:`VARIANTS` by name.

    ``options`` go to the class: ``bias``, ``dropout``, ``softmax_over``, ``fused``, ``device``,
    ``dtype``; for ``"super"`` also ``context_length`` (required), ``wa_sharing`` and ``wa_bias``.
    ``context_length`` is accepted and ignored by the other variants so that one call builds any.
    """
    if variant not in _CLASSES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cls = _CLASSES[variant]
    if cls is not SuperAttention:
        super_only = sorted({"wa_sharing", "wa_bias"} & options.keys())
        if super_only:
            raise ValueError(f"{super_only} only apply to variant 'super', got variant {variant!r}")
        options.pop("context_length", None)
    return cls(d_model, n_heads, **options)  # type: ignore[arg-type]


def merge_projections(layer: StandardAttention, variant: str) -> StandardAttention:
    r"""Fold a standard layer's ``W^V`` (and for ``"efficient"`` also ``W^K``) into its neighbours.

    In the row convention ``Y = X W + b``:

    * values: ``W^O' = W^V W^O`` and ``b^O' = b^V W^O + b^O`` (rows of ``S`` sum to one);
    * keys: ``W^Q' = W^Q (W^K)^\top`` and ``b^Q' = b^Q (W^K)^\top`` (the terms ``X W^Q (b^K)^\top``
      and ``b^Q (b^K)^\top`` are constant along each row of scores and cancel in a key-axis softmax).

    With one head and a key-axis softmax the result computes exactly what ``layer`` computes (the
    book proves it). With several heads the same algebra gives a *different* function: head ``i`` of
    the merged layer only sees the slice ``X_i``.
    """
    if variant not in ("optimised", "efficient"):
        raise ValueError(f"variant must be 'optimised' or 'efficient', got {variant!r}")
    if type(layer) is not StandardAttention:
        raise TypeError(f"layer must be a StandardAttention, got {type(layer).__name__}")
    weight = layer.q_proj.weight
    merged = make_attention(
        variant,
        layer.d_model,
        layer.n_heads,
        bias=layer.bias,
        dropout=layer.dropout,
        softmax_over=layer.softmax_over,
        device=weight.device,
        dtype=weight.dtype,
    )
    assert layer.k_proj is not None and layer.v_proj is not None
    q, k, v, o = layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj
    with torch.no_grad():
        # nn.Linear stores W^T, so W^V W^O is stored as (W^O)^T (W^V)^T = o.weight @ v.weight.
        merged.out_proj.weight.copy_(o.weight @ v.weight)
        if o.bias is not None:
            merged.out_proj.bias.copy_(o.weight @ v.bias + o.bias)
        if variant == "optimised":
            assert merged.k_proj is not None
            merged.q_proj.load_state_dict(q.state_dict())
            merged.k_proj.load_state_dict(k.state_dict())
        else:
            # W^Q (W^K)^T is stored transposed: (W^K) (W^Q)^T = k.weight^T @ q.weight.
            merged.q_proj.weight.copy_(k.weight.T @ q.weight)
            if q.bias is not None:
                merged.q_proj.bias.copy_(q.bias @ k.weight)
    return merged
