"""The four attention variants as Keras 3 layers, written with ``keras.ops`` only.

They mirror :mod:`pba.attention` option for option (same defaults, masks, causal mode and error
messages) and run on any Keras backend (TensorFlow, JAX, PyTorch). Weights use Keras' row
convention, ``y = x W + b``, so a Dense kernel is the transpose of a ``torch.nn.Linear`` weight;
:func:`pba.keras.copy_torch_to_keras` and :func:`pba.keras.copy_keras_to_torch` move weights.

The Keras layers always take the explicit path (scores materialised); the PyTorch layers' fused
path computes the same numbers.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from ..attention import (
    _CAUSAL_NEEDS_KEYS,
    VARIANTS,
    _check_choice,
    _check_layer_options,
    _check_positive_int,
    learned_projections,
)

__all__ = [
    "StandardAttention",
    "OptimisedAttention",
    "EfficientAttention",
    "SuperAttention",
    "make_attention",
]


@keras.saving.register_keras_serializable(package="pba")
class StandardAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention; see :class:`pba.attention.StandardAttention`.

    Call as ``layer(query, key=None, value=None, key_padding_mask=None, is_causal=False,
    need_weights=False, training=None)``. ``key_padding_mask`` is bool ``(B, L_k)``, ``True`` at
    **padding** (the meaning of ``torch.nn.MultiheadAttention`` and :mod:`pba.attention`);
    ``is_causal`` aligns the queries with the last ``L_q`` keys. Returns the output ``(B, L_q, d_model)``, and the weights ``(B, h, L_q, L_k)`` when
    ``need_weights`` is true.
    """

    #: the variant this class implements; which maps it learns comes from the PyTorch classes
    variant = "standard"

    @property
    def learns_keys(self) -> bool:
        """Whether the layer learns ``W^K`` (:func:`pba.attention.learned_projections`)."""
        return "k" in learned_projections(self.variant)

    @property
    def learns_values(self) -> bool:
        """Whether the layer learns ``W^V`` (:func:`pba.attention.learned_projections`)."""
        return "v" in learned_projections(self.variant)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        softmax_over: str = "keys",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        _check_layer_options(d_model, n_heads, dropout, softmax_over)
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.bias, self.dropout = bool(bias), float(dropout)
        self.softmax_over = softmax_over

        def dense(name: str) -> keras.layers.Dense:
            return keras.layers.Dense(
                d_model, use_bias=bias, kernel_initializer="glorot_uniform", name=name
            )

        self.q_proj = dense("q_proj")  # W^Q
        self.k_proj = dense("k_proj") if self.learns_keys else None  # W^K
        self.v_proj = dense("v_proj") if self.learns_values else None  # W^V
        self.out_proj = dense("out_proj")  # W^O
        self.attention_dropout = keras.layers.Dropout(self.dropout)

    def build(self, query_shape, *args: object, **kwargs: object) -> None:
        shape = (None, None, self.d_model)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj is not None:
                proj.build(shape)
        self.built = True

    # ----------------------------------------------------------------------------- hooks
    def project_key(self, key):
        return self.k_proj(key)

    def project_value(self, value, is_causal: bool):
        return self.v_proj(value)

    # ----------------------------------------------------------------------------- forward
    def split_heads(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.transpose(ops.reshape(x, (batch, length, self.n_heads, self.d_k)), (0, 2, 1, 3))

    def call(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        is_causal: bool = False,
        need_weights: bool = False,
        training=None,
    ):
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value, key_padding_mask, is_causal)
        q = self.split_heads(self.q_proj(query))  # (B, h, L_q, d_k)
        if key_padding_mask is not None:  # padded rows carry nothing, not even NaN (as in PyTorch)
            padded = ops.cast(key_padding_mask, "bool")[..., None]  # (B, L_k, 1)
            key = ops.where(padded, ops.zeros_like(key), key)
        k = self.split_heads(self.project_key(key))  # (B, h, L_k, d_k)
        if key_padding_mask is not None:
            value = ops.where(padded, ops.zeros_like(value), value)
        v = self.split_heads(self.project_value(value, is_causal))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(self.d_k)
        axis = -1 if self.softmax_over == "keys" else -2
        allowed = self._allowed(key_padding_mask, is_causal, ops.shape(query)[1], ops.shape(key)[1])
        if allowed is None:
            weights = ops.softmax(scores, axis=axis)
        else:
            empty = ops.logical_not(ops.any(allowed, axis=axis, keepdims=True))
            keep = ops.logical_or(allowed, empty)
            scores = ops.where(keep, scores, ops.full_like(scores, -float("inf")))
            weights = ops.softmax(scores, axis=axis)
            weights = ops.where(empty, ops.zeros_like(weights), weights)
        heads = ops.matmul(self.attention_dropout(weights, training=training), v)  # (B, h, L_q, d_k)
        batch, length = ops.shape(heads)[0], ops.shape(heads)[2]
        merged = ops.reshape(ops.transpose(heads, (0, 2, 1, 3)), (batch, length, self.d_model))
        out = self.out_proj(merged)
        return (out, weights) if need_weights else out

    def compute_output_spec(
        self, query, key=None, value=None, key_padding_mask=None, is_causal=False, need_weights=False, training=None
    ):
        """Output shapes for symbolic inputs (a functional model), from the shapes alone.

        Every backend can then build a model whose batch size or length is unknown, without
        tracing :meth:`call` symbolically (JAX cannot slice ``W^A`` to an unknown length).
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value, key_padding_mask, is_causal)
        out = keras.KerasTensor(query.shape, dtype=self.compute_dtype)
        if not need_weights:
            return out
        weights = (query.shape[0], self.n_heads, query.shape[1], key.shape[1])
        return out, keras.KerasTensor(weights, dtype=self.compute_dtype)

    @staticmethod
    def _allowed(key_padding_mask, is_causal: bool, len_q, len_k):
        """Bool, broadcastable to ``(B, h, L_q, L_k)``: ``True`` where query ``t`` may read key ``j``."""
        allowed = None
        if key_padding_mask is not None:
            allowed = ops.logical_not(ops.cast(key_padding_mask, "bool"))[:, None, None, :]
        if is_causal:
            causal = _causal(len_q, len_k)[None, None]
            allowed = causal if allowed is None else ops.logical_and(allowed, causal)
        return allowed

    def _check_inputs(self, query, key, value, key_padding_mask, is_causal: bool) -> None:
        """The PyTorch layers' checks, on the shapes Keras knows before running.

        In a functional model or a compiled step (``tf.function``, ``jax.jit``) a dimension may be
        unknown (``None``, the batch size usually); a check that needs it is skipped, never a crash.
        """
        shapes = {}
        for name, x in (("query", query), ("key", key), ("value", value)):
            if "float" not in str(keras.backend.standardize_dtype(x.dtype)):
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
            shape = _static_shape(x)
            if len(shape) != 3 or shape[-1] not in (None, self.d_model):
                raise ValueError(
                    f"{name} must have shape (batch, length, d_model={self.d_model}), got {shape}"
                )
            shapes[name] = shape
        if not _same(shapes["key"][1], shapes["value"][1]):
            raise ValueError(
                f"key and value must have the same length, got {shapes['key'][1]} and {shapes['value'][1]}"
            )
        if key_padding_mask is not None:
            if keras.backend.standardize_dtype(key_padding_mask.dtype) != "bool":
                raise TypeError(
                    "key_padding_mask must be a bool tensor (True = padding, as in torch.nn.MultiheadAttention), "
                    f"got {key_padding_mask.dtype}"
                )
            expected = (shapes["key"][0], shapes["key"][1])
            got = _static_shape(key_padding_mask)
            if len(got) != 2 or not all(_same(a, b) for a, b in zip(got, expected)):
                raise ValueError(f"key_padding_mask must have shape (batch, L_k) = {expected}, got {got}")
        if is_causal and self.softmax_over == "queries":
            raise ValueError(_CAUSAL_NEEDS_KEYS)
        len_q, len_k = shapes["query"][1], shapes["key"][1]
        if is_causal and len_q is not None and len_k is not None and len_q > len_k:
            raise ValueError(
                "is_causal=True needs L_q <= L_k (the queries are the last L_q of the keys' positions), "
                f"got L_q={len_q}, L_k={len_k}"
            )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            d_model=self.d_model,
            n_heads=self.n_heads,
            bias=self.bias,
            dropout=self.dropout,
            softmax_over=self.softmax_over,
        )
        return config


@keras.saving.register_keras_serializable(package="pba")
class OptimisedAttention(StandardAttention):
    """Optimised attention: no ``W^V``; head ``i`` reads the slice ``X_i`` as values."""

    variant = "optimised"

    def project_value(self, value, is_causal: bool):
        return value


@keras.saving.register_keras_serializable(package="pba")
class EfficientAttention(OptimisedAttention):
    """Efficient attention: no ``W^K`` either; keys are the slices ``X_i``."""

    variant = "efficient"

    def project_key(self, key):
        return key


@keras.saving.register_keras_serializable(package="pba")
class SuperAttention(EfficientAttention):
    """Super attention: efficient attention with values ``W^A X_i``; see
    :class:`pba.attention.SuperAttention` (``context_length``, ``wa_sharing``, ``wa_bias``)."""

    variant = "super"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        context_length: int | None = None,
        wa_sharing: str = "layer",
        wa_bias: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(d_model, n_heads, **kwargs)
        if context_length is None:
            raise ValueError("super attention needs context_length (the fixed length l of W^A)")
        self.context_length = _check_positive_int("context_length", context_length)
        self.wa_sharing = _check_choice("wa_sharing", wa_sharing, ("layer", "head"))
        self.use_wa_bias = bool(wa_bias)

    def build(self, query_shape, *args: object, **kwargs: object) -> None:
        copies = (self.n_heads,) if self.wa_sharing == "head" else ()
        l = self.context_length
        self.wa_weight = self.add_weight(
            shape=(*copies, l, l), initializer="glorot_uniform", name="wa_weight"
        )
        self.wa_bias = (
            self.add_weight(shape=(*copies, l), initializer="zeros", name="wa_bias")
            if self.use_wa_bias
            else None
        )
        super().build(query_shape)

    def project_value(self, value, is_causal: bool):
        length = ops.shape(value)[1]  # padded rows are zero already (call zeroes them)
        wa = self.wa_weight[..., :length, :length]
        if is_causal:  # lower-triangular: no value row mixes a later token
            wa = ops.where(_causal(length, length), wa, 0.0)
        if self.wa_sharing == "layer":
            mixed = ops.einsum("jm,bmd->bjd", wa, value)  # W^A X
            if self.wa_bias is not None:
                mixed = mixed + self.wa_bias[:length, None]
            return mixed
        heads = ops.einsum("hjm,bhmd->bhjd", wa, self.split_heads(value))  # W^A_i X_i
        if self.wa_bias is not None:
            heads = heads + self.wa_bias[:, :length, None]
        batch = ops.shape(value)[0]
        return ops.reshape(ops.transpose(heads, (0, 2, 1, 3)), (batch, length, self.d_model))

    def _check_inputs(self, query, key, value, key_padding_mask, is_causal: bool) -> None:
        super()._check_inputs(query, key, value, key_padding_mask, is_causal)
        len_k = _static_shape(key)[1]
        if len_k is not None and len_k > self.context_length:
            raise ValueError(
                f"super attention takes at most context_length={self.context_length} keys, got L_k={len_k}"
            )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            context_length=self.context_length,
            wa_sharing=self.wa_sharing,
            wa_bias=self.use_wa_bias,
        )
        return config


def _causal(len_q, len_k):
    """Bool ``(L_q, L_k)``: query ``t``, at position ``t + L_k - L_q``, may read key ``j`` at or before it.

    Built by comparing positions, so the lengths may be symbolic (a TensorFlow graph).
    """
    query_position = ops.arange(len_q)[:, None] + (len_k - len_q)
    return ops.less_equal(ops.arange(len_k)[None, :], query_position)


def _static_shape(x) -> tuple:
    """The shape Keras knows without running: ints, and ``None`` for a dimension not known yet."""
    return tuple(d if isinstance(d, int) else None for d in tuple(x.shape))


def _same(a, b) -> bool:
    """Two dimensions agree, or one of them is not known yet."""
    return a is None or b is None or a == b


_CLASSES = {cls.variant: cls for cls in (StandardAttention, OptimisedAttention, EfficientAttention, SuperAttention)}


def make_attention(variant: str, d_model: int, n_heads: int, **options: object) -> StandardAttention:
    """The Keras twin of :func:`pba.attention.make_attention`."""
    if variant not in _CLASSES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "super":
        super_only = sorted({"wa_sharing", "wa_bias"} & options.keys())
        if super_only:
            raise ValueError(f"{super_only} only apply to variant 'super', got variant {variant!r}")
        options.pop("context_length", None)
    return _CLASSES[variant](d_model, n_heads, **options)
