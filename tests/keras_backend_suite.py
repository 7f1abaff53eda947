"""pba.keras on the Keras backend that ``KERAS_BACKEND`` names (tensorflow, jax or torch).

Keras fixes its backend when it is imported, so ``tests/test_keras_backends.py`` runs this file once
per backend, each in its own process. Inputs are NumPy arrays; expected values come from the
PyTorch layers. (``tests/test_keras.py`` adds torch-backend tests that drive autograd directly.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

import pba  # noqa: E402
import pba.keras as pk  # noqa: E402
from pba.keras.parity import input_gradient, torch_parity  # noqa: E402

D, H, L = 16, 4, 8
BACKEND = keras.backend.backend()


def to_numpy(x) -> np.ndarray:  # noqa: ANN001
    return keras.ops.convert_to_numpy(keras.ops.stop_gradient(x))


def pair(variant: str):
    torch.manual_seed(0)
    torch_layer = pba.make_attention(variant, D, H, context_length=L)
    for p in torch_layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    keras_layer = pk.make_attention(variant, D, H, context_length=L)
    pk.copy_torch_to_keras(torch_layer, keras_layer)
    return torch_layer, keras_layer


def test_the_backend_is_the_one_asked_for() -> None:
    import os

    assert BACKEND == os.environ.get("KERAS_BACKEND", "torch")


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_outputs_and_input_gradients_match_torch(variant: str) -> None:
    parity = torch_parity(variant)
    assert parity["outputs"] < 1e-5 and parity["input_gradients"] < 1e-5, parity


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "decode"])
def test_masks_match_torch(variant: str, masks: str) -> None:
    torch_layer, keras_layer = pair(variant)
    x = np.random.default_rng(1).standard_normal((3, L, D)).astype("float32")
    padding = np.arange(L)[None, :] >= np.array([L, 5, 0])[:, None] if masks == "padding" else None
    query = x[:, -3:] if masks == "decode" else x
    causal = masks in ("causal", "decode")
    with torch.no_grad():
        expected = torch_layer(
            torch.tensor(query), torch.tensor(x), key_padding_mask=None if padding is None else torch.tensor(padding), is_causal=causal
        ).numpy()
    got = to_numpy(keras_layer(query, x, key_padding_mask=padding, is_causal=causal))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_weights_travel_both_ways(variant: str) -> None:
    torch_layer, keras_layer = pair(variant)
    fresh = pba.make_attention(variant, D, H, context_length=L)
    pk.copy_keras_to_torch(keras_layer, fresh)
    for (name, a), b in zip(torch_layer.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=0)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_functional_model_with_unknown_batch_and_length(variant: str) -> None:
    """Symbolic inputs (batch and length unknown), masks and causal mode, then a compiled fit."""
    _, layer = pair(variant)
    x_in = keras.Input((None, D))
    padding_in = keras.Input((None,), dtype="bool")
    model = keras.Model([x_in, padding_in], layer(x_in, key_padding_mask=padding_in, is_causal=True))
    x = np.random.default_rng(2).standard_normal((3, 5, D)).astype("float32")
    padding = np.arange(5)[None, :] >= np.array([5, 3, 1])[:, None]
    direct = to_numpy(layer(x, key_padding_mask=padding, is_causal=True))
    np.testing.assert_allclose(to_numpy(model([x, padding])), direct, atol=1e-6)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")  # compiled: tf.function / jax.jit
    model.fit([x, padding], x, epochs=1, verbose=0)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_classifier_fits_saves_and_loads(variant: str, tmp_path: Path) -> None:
    """The IMDB classifier on this backend: two compiled fit steps lower the loss, then a save/load round trip."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 30, size=(64, 12)).astype("int32")
    labels = rng.integers(0, 2, size=(64, 1)).astype("float32")
    ids[:, 0] = labels[:, 0].astype("int32") + 1  # token 1 or 2 gives the label away
    ids[::2, 9:] = 0  # padding
    model = pk.build_imdb_classifier(variant, vocab_size=30, context_length=12, d_model=D, n_heads=H, d_ff=16, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(ids, labels, epochs=2, batch_size=64, shuffle=False, verbose=0)
    first, second = history.history["loss"]
    assert second < first, history.history
    path = tmp_path / f"imdb_{variant}.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(restored(ids)), to_numpy(model(ids)), atol=1e-6)


def test_input_gradient_helper_is_right() -> None:
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    np.testing.assert_allclose(input_gradient(lambda t: keras.ops.sum(t * t), x), 2 * x, atol=1e-6)


def test_errors_on_known_shapes() -> None:
    layer = pk.make_attention("super", D, H, context_length=L)
    x = np.zeros((2, L, D), "float32")
    with pytest.raises(ValueError, match=r"at most context_length=8 keys, got L_k=9"):
        layer(np.zeros((1, L + 1, D), "float32"))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(True = padding"):
        layer(x, key_padding_mask=np.zeros((2, L), "int32"))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, L_k\) = \(2, 8\), got \(2, 7\)"):
        layer(x, key_padding_mask=np.zeros((2, L - 1), bool))
    with pytest.raises(ValueError, match=r"is_causal=True needs L_q <= L_k"):
        layer(x, x[:, :5], is_causal=True)
    with pytest.raises(ValueError, match=r"at most context_length=8 keys, got L_k=9"):  # at build time, symbolically
        layer(keras.Input((L + 1, D)))
