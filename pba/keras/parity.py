"""How closely the Keras layers follow the PyTorch layers on the running Keras backend.

:func:`torch_parity` builds a PyTorch layer with random weights, copies them into the Keras layer
of the same variant, and compares outputs and the gradient of ``sum(output * probe)`` with respect
to the input, on the same random input with a padding mask and causal attention. It is what
``tests/keras_backend_suite.py`` asserts on every backend and what
``scripts/keras_backend_parity.py`` records for the book.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
from keras import ops

from .layers import make_attention
from .transfer import copy_torch_to_keras

__all__ = ["input_gradient", "torch_parity"]


def input_gradient(fn: Callable[[object], object], x: np.ndarray) -> np.ndarray:
    """``d fn(x) / d x`` for a scalar ``fn`` written with ``keras.ops``, by the backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            value = fn(tensor)
        return tape.gradient(value, tensor).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(fn)(jax.numpy.asarray(x)))
    if backend == "torch":
        import torch

        tensor = torch.tensor(x, requires_grad=True)
        fn(tensor).backward()
        return tensor.grad.numpy()
    raise NotImplementedError(f"no gradient helper for Keras backend {backend!r}")


def torch_parity(variant: str, *, d_model: int = 16, n_heads: int = 4, length: int = 8, seed: int = 0) -> dict[str, float]:
    """Largest absolute differences, Keras against PyTorch: ``outputs`` and ``input_gradients``.

    Batch of 3, float32, random weights (biases too), right padding in two items, causal.
    """
    import torch

    import pba

    torch.manual_seed(seed)
    torch_layer = pba.make_attention(variant, d_model, n_heads, context_length=length)
    for parameter in torch_layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    keras_layer = make_attention(variant, d_model, n_heads, context_length=length)
    copy_torch_to_keras(torch_layer, keras_layer)

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, length, d_model)).astype("float32")
    probe = rng.standard_normal((3, length, d_model)).astype("float32")
    padding = np.arange(length)[None, :] >= np.array([length, length - 3, 2])[:, None]  # True = padding

    x_torch = torch.tensor(x, requires_grad=True)
    expected = torch_layer(x_torch, key_padding_mask=torch.tensor(padding), is_causal=True)
    (expected * torch.tensor(probe)).sum().backward()

    got = ops.convert_to_numpy(ops.stop_gradient(keras_layer(x, key_padding_mask=padding, is_causal=True)))
    probe_tensor = ops.convert_to_tensor(probe)
    gradient = input_gradient(
        lambda inputs: ops.sum(keras_layer(inputs, key_padding_mask=padding, is_causal=True) * probe_tensor), x
    )
    return {
        "outputs": float(np.abs(got - expected.detach().numpy()).max()),
        "input_gradients": float(np.abs(gradient - x_torch.grad.numpy()).max()),
    }
