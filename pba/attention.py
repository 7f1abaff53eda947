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

This module depends on ``torch`` alone: the layers can be lifted into any model.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VARIANTS",
    "StandardAttention",
    "OptimisedAttention",
    "EfficientAttention",
    "SuperAttention",
    "make_attention",
    "learned_projections",
    "PROJECTION_ATTRIBUTES",
    "split_heads",
    "merge_heads",
    "mix_tokens",
    "standard_from_torch",
    "merge_projections",
]

VARIANTS: tuple[str, ...] = ("standard", "optimised", "efficient", "super")

SoftmaxOver = Literal["keys", "queries"]
WaSharing = Literal["layer", "head"]


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """``(B, L, d_model) -> (B, h, L, d_k)``: head ``i`` sees columns ``i*d_k .. (i+1)*d_k``."""
    batch, length, d_model = x.shape
    return x.view(batch, length, n_heads, d_model // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, h, L, d_k) -> (B, L, h*d_k)``: the concatenation ``[H_1 ... H_h]``."""
    batch, n_heads, length, d_k = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_heads * d_k)


class _MixTokens(torch.autograd.Function):
    """``W^A X`` for every item of a batch: ``(L, L), (B, L, d) -> (B, L, d)``; the numbers of ``wa @ x``.

    ``wa @ x`` broadcasts ``W^A`` over the batch by copying ``x`` into a ``(B*d, L)`` matrix and the
    result back. This function avoids both copies:

    * forward, ``Y_b = W^A X_b``: one batched product over ``B`` stride-0 views of ``W^A``
      (``expand`` allocates nothing);
    * ``dX_b = (W^A)^T dY_b``: the same batched product with ``(W^A)^T``;
    * ``dW^A = sum_b dY_b X_b^T``: one ``(L, B*d) @ (B*d, L)`` product. It is the product that
      ``wa @ x``'s own backward computes, so it rounds the same way and a model trained through
      either gets the same numbers (a batched product followed by a sum over ``b`` would round
      differently).

    ``tests/test_attention.py`` checks its values and gradients against ``wa @ x`` and its second
    derivatives numerically; ``benchmarks/attention_speed.py`` times super attention, which calls it.
    """

    generate_vmap_rule = True  # vmap-able wherever mix_tokens does not route around it

    @staticmethod
    def forward(wa: Tensor, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return torch.bmm(wa.expand(batch, length, length), x)  # (B, L, d)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
        wa, x = ctx.saved_tensors
        batch, length, d = x.shape
        grad_wa = grad_x = None
        if ctx.needs_input_grad[0]:  # dW^A = sum_b dY_b X_b^T: (L, B*d) @ (B*d, L)
            grad_wa = (x.mT.reshape(batch * d, length).t() @ grad.mT.reshape(batch * d, length)).t()
        if ctx.needs_input_grad[1]:  # dX_b = (W^A)^T dY_b
            grad_x = torch.bmm(wa.mT.expand(batch, length, length), grad)
        return grad_wa, grad_x


#: Whether a tensor is a ``torch.func.vmap`` wrapper (functorch's own test; absent: never).
_is_vmapped = getattr(torch._C._functorch, "is_batchedtensor", lambda tensor: False)


def mix_tokens(wa: Tensor, x: Tensor) -> Tensor:
    """``W^A X`` for each item: ``(L, L), (B, L, d) -> (B, L, d)``; equals ``wa @ x``, with fewer copies.

    Under ``torch.func.vmap`` (replicas trained together by :class:`pba.train.ReplicaEngine`) it is
    plain ``wa @ x``: vmap already turns that product into one batched product without the copies,
    so ``_MixTokens`` (whose batching rule torch would generate) has nothing to add there.
    """
    if _is_vmapped(wa) or _is_vmapped(x):
        return wa @ x
    return _MixTokens.apply(wa, x)


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

    Masks:
        ``key_padding_mask`` is a bool tensor ``(B, L_k)`` where ``True`` marks a **real** token
        (the convention of ``F.scaled_dot_product_attention`` and Hugging Face's
        ``attention_mask``; ``torch.nn.MultiheadAttention`` uses the opposite). ``is_causal=True``
        lets query ``t`` see keys ``<= t`` (needs ``L_q == L_k``). A query that may see no key at all
        gets all-zero attention weights, so its output is the output bias ``b^O`` (never NaN).
        Padded key and value rows are set to zero before any projection, so nothing they hold (not
        even NaN or inf, which a zero attention weight does not cancel) reaches a real token.

    Inputs must have the parameters' dtype (a ``TypeError`` names the argument and both dtypes),
    except under :func:`torch.autocast`, which casts them.

    Second derivatives: the explicit path (``fused=False``) supports double backward (gradient
    penalties, Hessian-vector products). On CPU the fused path runs torch's
    ``_scaled_dot_product_flash_attention_for_cpu``, whose backward torch cannot differentiate:
    differentiating a gradient taken through it raises a ``RuntimeError``. Use ``fused=False`` there.
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
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)  # W^Q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **factory) if self.learns_keys else None
        self.v_proj = (
            nn.Linear(d_model, d_model, bias=bias, **factory) if self.learns_values else None
        )
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)  # W^O
        self._reset_projections()

    def _reset_projections(self) -> None:
        """Xavier-uniform input projections with zero biases, as ``nn.MultiheadAttention``."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

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
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` ``(B, L_q, d_model)`` to ``key``/``value`` ``(B, L_k, d_model)``.

        ``key`` and ``value`` default to ``query`` (self-attention). Returns the output
        ``(B, L_q, d_model)``, and with ``need_weights=True`` also the attention weights
        ``(B, h, L_q, L_k)`` (after the softmax, before dropout).
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value, key_padding_mask, is_causal)
        len_q, len_k = query.shape[1], key.shape[1]

        q = split_heads(self.project_query(query), self.n_heads)  # (B, h, L_q, d_k)
        if key_padding_mask is not None:
            # Padded rows must carry nothing. Their scores are masked, but a padded value row still
            # enters S V with weight 0 (0 * NaN = NaN), and the fused kernel adds the mask to the
            # scores (NaN - inf = NaN). Zeroed, they are harmless on both paths, and super
            # attention's W^A, which mixes value rows, mixes zeros into the real tokens. Each is
            # zeroed just before its own projection, which fixes the order in which autograd sums
            # the input's gradients (committed results depend on that order).
            padded = ~key_padding_mask[..., None]  # (B, L_k, 1)
            key = key.masked_fill(padded, 0.0)
        k = split_heads(self.project_key(key), self.n_heads)  # (B, h, L_k, d_k)
        if key_padding_mask is not None:
            value = value.masked_fill(padded, 0.0)
        v = split_heads(self.project_value(value, is_causal), self.n_heads)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if self.fused and not need_weights and self.softmax_over == "keys":
            if key_padding_mask is None:  # a causal mask alone goes to the kernel as a flag
                heads = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
            else:
                allowed = self._allowed(key_padding_mask, is_causal, len_q, len_k, query.device)
                heads = self._fused_heads(q, k, v, allowed, dropout_p)
        else:
            allowed = self._allowed(key_padding_mask, is_causal, len_q, len_k, query.device)
            heads, weights = self._explicit_heads(q, k, v, allowed, dropout_p)
        out = self.out_proj(merge_heads(heads))  # (B, L_q, d_model)
        return (out, weights) if need_weights else out

    def _explicit_heads(
        self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout_p: float
    ) -> tuple[Tensor, Tensor]:
        """Materialise the scores: readable, returns weights, supports every option."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, h, L_q, L_k)
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

    def _fused_heads(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, dropout_p: float) -> Tensor:
        """The same heads through ``F.scaled_dot_product_attention`` with a bool mask."""
        empty = ~allowed.any(dim=-1, keepdim=True)  # queries that may see no key
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p)
        return heads.masked_fill(empty, 0.0)

    @staticmethod
    def _allowed(
        key_padding_mask: Tensor | None, is_causal: bool, len_q: int, len_k: int, device: torch.device
    ) -> Tensor | None:
        """Bool ``(B or 1, 1, L_q, L_k)``: ``True`` where query ``t`` may read key ``j``."""
        allowed = None
        if key_padding_mask is not None:
            allowed = key_padding_mask[:, None, None, :]  # (B, 1, 1, L_k)
        if is_causal:
            causal = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril()
            allowed = causal[None, None] if allowed is None else allowed & causal
        return allowed

    # ----------------------------------------------------------------------------- checks
    def _check_tensor(self, name: str, x: Tensor) -> None:
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
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name} must have shape (batch, length, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        for name, x in (("query", query), ("key", key), ("value", value)):
            self._check_tensor(name, x)
        if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
            raise ValueError(
                "query, key and value must share the batch size, got "
                f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}"
            )
        if value.shape[1] != key.shape[1]:
            raise ValueError(
                f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}"
            )
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(
                    key_padding_mask
                ).__name__
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = real token), got {got}"
                )
            expected = (key.shape[0], key.shape[1])
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must have shape (batch, L_k) = {expected}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        if is_causal and self.softmax_over == "queries":
            raise ValueError(_CAUSAL_NEEDS_KEYS)
        if is_causal and query.shape[1] != key.shape[1]:
            raise ValueError(
                f"is_causal=True needs L_q == L_k, got L_q={query.shape[1]}, L_k={key.shape[1]}"
            )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, bias={self.bias}, "
            f"dropout={self.dropout}, softmax_over={self.softmax_over!r}, fused={self.fused}"
        )


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
    false) are zero when ``W^A`` mixes them (the shared forward zeroes them first), so they never
    leak into real tokens. With ``is_causal=True`` ``W^A`` acts lower-triangular, so no token reads a later
    one.

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
        self.wa_bias = (
            nn.Parameter(torch.zeros(*copies, context_length, **factory)) if wa_bias else None
        )
        for wa in self.wa_weight.data.view(-1, context_length, context_length):
            nn.init.xavier_uniform_(wa)  # as the reference reimplementation

    def effective_wa(self, length: int, is_causal: bool = False) -> Tensor:
        """``W^A[:L, :L]``, lower-triangular when causal: ``(L, L)`` or ``(h, L, L)``."""
        wa = self.wa_weight[..., :length, :length]
        return wa.tril() if is_causal else wa

    def project_value(self, value: Tensor, is_causal: bool) -> Tensor:
        length = value.shape[1]
        wa = self.effective_wa(length, is_causal)
        if self.wa_sharing == "layer":
            mixed = mix_tokens(wa, value)  # (L, L) @ (B, L, d_model): W^A X, all heads at once
            if self.wa_bias is not None:
                mixed = mixed + self.wa_bias[:length, None]
            return mixed
        heads = wa @ split_heads(value, self.n_heads)  # (h, L, L) @ (B, h, L, d_k): W^A_i X_i
        if self.wa_bias is not None:
            heads = heads + self.wa_bias[:, :length, None]
        return merge_heads(heads)

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        super()._check_inputs(query, key, value, key_padding_mask, is_causal)
        if key.shape[1] > self.context_length:
            raise ValueError(
                f"super attention takes at most context_length={self.context_length} keys, "
                f"got L_k={key.shape[1]}"
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


def standard_from_torch(mha: nn.MultiheadAttention) -> StandardAttention:
    """A :class:`StandardAttention` holding the weights of a ``torch.nn.MultiheadAttention``.

    ``mha`` must be batch-first-agnostic self-attention with equal ``kdim``/``vdim`` (the default).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
    if mha.in_proj_weight is None:
        raise ValueError("mha must use one packed in_proj_weight (kdim == vdim == embed_dim)")
    weight = mha.in_proj_weight
    layer = StandardAttention(
        mha.embed_dim,
        mha.num_heads,
        bias=mha.in_proj_bias is not None,
        dropout=mha.dropout,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
            assert proj is not None
            proj.weight.copy_(weight[i * mha.embed_dim : (i + 1) * mha.embed_dim])
            if proj.bias is not None:
                proj.bias.copy_(mha.in_proj_bias[i * mha.embed_dim : (i + 1) * mha.embed_dim])
        layer.out_proj.weight.copy_(mha.out_proj.weight)
        if layer.out_proj.bias is not None:
            layer.out_proj.bias.copy_(mha.out_proj.bias)
    return layer


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
