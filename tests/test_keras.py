"""pba.keras: numerically the same layers as pba.attention, serialisable, and trainable with fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these parity tests drive autograd through the torch backend", allow_module_level=True)

import pba  # noqa: E402
import pba.keras as pk  # noqa: E402

from .test_attention import OPTION_GRID, right_padding_mask  # noqa: E402

D, H, L = 16, 4, 8
CASES = [
    (variant, options)
    for variant in pba.VARIANTS
    for options in OPTION_GRID
    if variant == "super" or not {"wa_sharing", "wa_bias"} & options.keys()
]


def pair(variant: str, **options: object):
    torch.manual_seed(0)
    torch_layer = pba.make_attention(variant, D, H, context_length=L, **options)
    for p in torch_layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    keras_layer = pk.make_attention(variant, D, H, context_length=L, **options)
    pk.copy_torch_to_keras(torch_layer, keras_layer)
    return torch_layer, keras_layer


def keras_params(keras_layer) -> dict[str, torch.Tensor]:
    """Keras variables by torch-style name, as torch tensors in torch's layout."""
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        proj = getattr(keras_layer, name)
        if proj is not None:
            out[f"{name}.weight"] = proj.kernel.value
            if proj.use_bias:
                out[f"{name}.bias"] = proj.bias.value
    if isinstance(keras_layer, pk.SuperAttention):
        out["wa_weight"] = keras_layer.wa_weight.value
        if keras_layer.wa_bias is not None:
            out["wa_bias"] = keras_layer.wa_bias.value
    return out


# Causal attention needs a key-axis softmax (an error on both sides, tested below).
PARITY = [
    (variant, options, masks)
    for variant, options in CASES
    for masks in ("none", "padding", "causal", "both")
    if not (masks in ("causal", "both") and options.get("softmax_over") == "queries")
]


@pytest.mark.parametrize(("variant", "options", "masks"), PARITY)
def test_outputs_and_gradients_match_torch(variant: str, options: dict, masks: str) -> None:
    causal = masks in ("causal", "both")
    torch_layer, keras_layer = pair(variant, **options)
    pad = right_padding_mask([L, 5, 2], L) if masks in ("padding", "both") else None
    x_torch = torch.randn(3, L, D, requires_grad=True)
    x_keras = x_torch.detach().clone().requires_grad_()
    expected = torch_layer(x_torch, key_padding_mask=pad, is_causal=causal)
    got = keras_layer(x_keras, key_padding_mask=pad, is_causal=causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    probe = torch.randn_like(expected)
    (expected * probe).sum().backward()
    (got * probe).sum().backward()
    torch.testing.assert_close(x_keras.grad, x_torch.grad, atol=1e-5, rtol=1e-5)
    torch_grads = {n: p.grad for n, p in torch_layer.named_parameters()}
    for name, variable in keras_params(keras_layer).items():
        expected_grad = torch_grads[name].T if name.endswith("proj.weight") else torch_grads[name]
        torch.testing.assert_close(variable.grad, expected_grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_nan_in_padded_tokens_stays_there(variant: str) -> None:
    """As in PyTorch, padded key and value rows are zeroed: NaN there never reaches a real token."""
    torch_layer, keras_layer = pair(variant)
    pad = right_padding_mask([L, 5], L)
    real = ~pad
    x = torch.randn(2, L, D)
    poisoned = torch.where(real[..., None], x, torch.full_like(x, float("nan")))
    got = keras_layer(poisoned, key_padding_mask=pad)
    assert got[real].isfinite().all()
    torch.testing.assert_close(got[real], torch_layer(x, key_padding_mask=pad)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_learns_the_same_maps_as_torch(variant: str) -> None:
    keras_layer = pk.make_attention(variant, D, H, context_length=L)
    torch_class = type(pba.make_attention(variant, D, H, context_length=L))
    assert (keras_layer.learns_keys, keras_layer.learns_values) == (torch_class.learns_keys, torch_class.learns_values)
    assert (keras_layer.k_proj is None, keras_layer.v_proj is None) == (not torch_class.learns_keys, not torch_class.learns_values)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_weights_round_trip_and_need_weights(variant: str) -> None:
    torch_layer, keras_layer = pair(variant)
    fresh = pba.make_attention(variant, D, H, context_length=L)
    pk.copy_keras_to_torch(keras_layer, fresh)
    for (name, a), (_, b) in zip(torch_layer.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    x = torch.randn(2, 5, D)
    _, w_keras = keras_layer(x, need_weights=True)
    _, w_torch = torch_layer(x, need_weights=True)
    torch.testing.assert_close(w_keras, w_torch, atol=1e-6, rtol=1e-5)


def test_transfer_refuses_mismatched_layers() -> None:
    with pytest.raises(TypeError, match="cannot pair EfficientAttention with SuperAttention"):
        pk.copy_torch_to_keras(pba.make_attention("efficient", D, H), pk.make_attention("super", D, H, context_length=L))
    with pytest.raises(ValueError, match="n_heads differs: torch layer has 4, keras layer has 2"):
        pk.copy_torch_to_keras(pba.make_attention("standard", D, H), pk.make_attention("standard", D, 2))


def test_errors_match_torch() -> None:
    layer = pk.make_attention("super", D, H, context_length=L)
    x = torch.randn(2, L, D)
    with pytest.raises(ValueError, match=r"at most context_length=8 keys, got L_k=9"):
        layer(torch.randn(1, L + 1, D))
    with pytest.raises(ValueError, match=r"query must have shape \(batch, length, d_model=16\)"):
        layer(torch.randn(2, L))
    with pytest.raises(TypeError, match="query must be a floating-point tensor"):
        layer(torch.ones(2, L, D, dtype=torch.long))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(True = padding, as in torch.nn.MultiheadAttention\)"):
        layer(x, key_padding_mask=torch.ones(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, L_k\) = \(2, 8\), got \(2, 7\)"):
        layer(x, key_padding_mask=torch.ones(2, L - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal=True needs softmax_over='keys'"):
        pk.make_attention("standard", D, H, softmax_over="queries")(x, is_causal=True)
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, got d_model=10, n_heads=4"):
        pk.StandardAttention(10, 4)
    with pytest.raises(ValueError, match="needs context_length"):
        pk.make_attention("super", D, H)
    with pytest.raises(ValueError, match=r"variant must be one of \('standard', 'optimised', 'efficient', 'super'\)"):
        pk.make_attention("linear", D, H)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_config_round_trip(variant: str) -> None:
    options = {"wa_sharing": "head", "wa_bias": True} if variant == "super" else {}
    layer = pk.make_attention(variant, D, H, context_length=L, dropout=0.1, softmax_over="queries", **options)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_save_and_load_a_model(tmp_path: Path) -> None:
    model = pk.build_imdb_classifier("super", vocab_size=50, context_length=L, d_model=D, n_heads=H, d_ff=8, wa_bias=True)
    ids = np.random.default_rng(0).integers(1, 50, size=(4, L)).astype("int32")
    ids[0, 5:] = 0
    path = tmp_path / "imdb_super.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(ids)), keras.ops.convert_to_numpy(model(ids)), atol=1e-6
    )
    assert restored.get_layer("block0").attention.use_wa_bias


def test_keras_classifier_learns_with_fit() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, length, vocab = 1024, 12, 30
    ids = rng.integers(3, vocab, size=(n, length)).astype("int32")
    labels = rng.integers(0, 2, size=n).astype("float32")
    ids[np.arange(n), rng.integers(0, length, size=n)] = labels.astype("int32") + 1  # token 1 or 2: the label
    model = pk.build_imdb_classifier("efficient", vocab_size=vocab, context_length=length, d_model=16, n_heads=2, d_ff=16)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    history = model.fit(ids[:768], labels[:768], validation_data=(ids[768:], labels[768:]), epochs=8, batch_size=32, verbose=0)
    assert history.history["val_binary_accuracy"][-1] > 0.9


def test_import_pba_does_not_import_keras() -> None:
    code = "import sys, pba, pba.data, pba.models, pba.train, pba.experiments; assert 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
