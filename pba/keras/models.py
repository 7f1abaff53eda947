"""The IMDB classifier of :mod:`pba.models` as a Keras model, trainable with ``model.fit``."""

from __future__ import annotations

import keras
from keras import ops

from .layers import make_attention

__all__ = ["TokenAndPositionEmbedding", "EncoderBlock", "MaskedMeanPooling", "build_imdb_classifier"]


@keras.saving.register_keras_serializable(package="pba")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token ids ``(B, L)`` -> token embedding + learned position embedding ``(B, L, d_model)``."""

    def __init__(self, vocab_size: int, context_length: int, d_model: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.vocab_size, self.context_length, self.d_model = vocab_size, context_length, d_model
        self.token = keras.layers.Embedding(vocab_size, d_model, name="token")
        self.position = keras.layers.Embedding(context_length, d_model, name="position")

    def build(self, ids_shape) -> None:
        self.token.build(ids_shape)
        self.position.build((None,))
        self.built = True

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[1])
        return self.token(ids) + self.position(positions)[None]

    def get_config(self) -> dict:
        return {**super().get_config(), "vocab_size": self.vocab_size, "context_length": self.context_length, "d_model": self.d_model}


@keras.saving.register_keras_serializable(package="pba")
class EncoderBlock(keras.layers.Layer):
    """Post-LN block ``LN(x + Drop(MHA(x)))``, ``LN(z + Drop(FFN(z)))`` with a ``pba`` variant."""

    def __init__(
        self,
        variant: str,
        d_model: int,
        n_heads: int,
        d_ff: int,
        context_length: int,
        dropout: float = 0.1,
        attention_options: dict | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.variant, self.d_model, self.n_heads, self.d_ff = variant, d_model, n_heads, d_ff
        self.context_length, self.rate = context_length, dropout
        self.attention_options = dict(attention_options or {})
        self.attention = make_attention(
            variant, d_model, n_heads, context_length=context_length, name="attention", **self.attention_options
        )
        self.ffn = keras.Sequential(
            [keras.layers.Dense(d_ff, activation="relu"), keras.layers.Dense(d_model)], name="ffn"
        )
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.drop1 = keras.layers.Dropout(dropout)
        self.drop2 = keras.layers.Dropout(dropout)

    def build(self, x_shape, key_padding_mask_shape=None) -> None:
        self.attention.build(x_shape)
        self.ffn.build(x_shape)
        self.norm1.build(x_shape)
        self.norm2.build(x_shape)
        self.built = True

    def call(self, x, key_padding_mask=None, training=None):
        z = self.norm1(x + self.drop1(self.attention(x, key_padding_mask=key_padding_mask, training=training), training=training))
        return self.norm2(z + self.drop2(self.ffn(z), training=training))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "variant": self.variant,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_ff": self.d_ff,
            "context_length": self.context_length,
            "dropout": self.rate,
            "attention_options": self.attention_options,
        }


@keras.saving.register_keras_serializable(package="pba")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over real tokens (``real`` true); over all tokens when ``real`` is ``None``."""

    def call(self, x, real=None):
        if real is None:
            return ops.mean(x, axis=1)
        weights = ops.cast(real, x.dtype)[..., None]
        return ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)


def build_imdb_classifier(
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
) -> keras.Model:
    """The classifier of :class:`pba.models.IMDBClassifier` as a functional Keras model.

    Input: int token ids ``(B, context_length)``; output: one logit per review ``(B, 1)``. Compile
    with ``keras.losses.BinaryCrossentropy(from_logits=True)``.
    """
    ids = keras.Input(shape=(context_length,), dtype="int32", name="ids")
    real = ops.not_equal(ids, pad_id)
    padding = ops.equal(ids, pad_id)
    x = TokenAndPositionEmbedding(vocab_size, context_length, d_model, name="embedding")(ids)
    for index in range(n_blocks):
        block = EncoderBlock(
            variant, d_model, n_heads, d_ff, context_length, dropout, attention_options, name=f"block{index}"
        )
        x = block(x, key_padding_mask=padding if padding_mask else None)
    x = MaskedMeanPooling(name="pool")(x, real=real if masked_pooling else None)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(6, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(1, name="logit")(x)
    return keras.Model(ids, logits, name=f"imdb_{variant}")
