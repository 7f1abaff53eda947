"""Copy weights between :mod:`pba.attention` (PyTorch) and :mod:`pba.keras` layers.

``torch.nn.Linear`` stores ``W^T`` (out x in); a Keras ``Dense`` kernel is ``W`` (in x out).
"""

from __future__ import annotations

import numpy as np

from .. import attention as torch_attention
from . import layers

__all__ = ["copy_torch_to_keras", "copy_keras_to_torch"]

_PAIRS = {
    torch_attention.StandardAttention: layers.StandardAttention,
    torch_attention.OptimisedAttention: layers.OptimisedAttention,
    torch_attention.EfficientAttention: layers.EfficientAttention,
    torch_attention.SuperAttention: layers.SuperAttention,
}


def _check_pair(torch_layer, keras_layer) -> None:
    expected = _PAIRS.get(type(torch_layer))
    if expected is None or type(keras_layer) is not expected:
        raise TypeError(
            f"cannot pair {type(torch_layer).__name__} with {type(keras_layer).__name__}: "
            "use the same variant on both sides"
        )
    for name in ("d_model", "n_heads", "bias"):
        if getattr(torch_layer, name) != getattr(keras_layer, name):
            raise ValueError(
                f"{name} differs: torch layer has {getattr(torch_layer, name)}, "
                f"keras layer has {getattr(keras_layer, name)}"
            )
    if isinstance(torch_layer, torch_attention.SuperAttention):
        for name in ("context_length", "wa_sharing"):
            if getattr(torch_layer, name) != getattr(keras_layer, name):
                raise ValueError(f"{name} differs between the torch and keras layers")
        if (torch_layer.wa_bias is not None) != keras_layer.use_wa_bias:
            raise ValueError("wa_bias differs between the torch and keras layers")


def _projections(torch_layer, keras_layer):
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        torch_proj = getattr(torch_layer, name)
        if torch_proj is not None:
            yield torch_proj, getattr(keras_layer, name)


def copy_torch_to_keras(torch_layer, keras_layer) -> None:
    """Load a PyTorch ``pba`` layer's weights into the Keras layer of the same variant."""
    _check_pair(torch_layer, keras_layer)
    if not keras_layer.built:
        keras_layer.build((None, None, keras_layer.d_model))
    as_numpy = lambda t: t.detach().cpu().numpy()
    for torch_proj, keras_proj in _projections(torch_layer, keras_layer):
        weights = [as_numpy(torch_proj.weight).T]
        if torch_proj.bias is not None:
            weights.append(as_numpy(torch_proj.bias))
        keras_proj.set_weights(weights)
    if isinstance(torch_layer, torch_attention.SuperAttention):
        keras_layer.wa_weight.assign(as_numpy(torch_layer.wa_weight))
        if torch_layer.wa_bias is not None:
            keras_layer.wa_bias.assign(as_numpy(torch_layer.wa_bias))


def copy_keras_to_torch(keras_layer, torch_layer) -> None:
    """Load a Keras ``pba`` layer's weights into the PyTorch layer of the same variant."""
    import torch

    _check_pair(torch_layer, keras_layer)
    as_tensor = lambda v, like: torch.as_tensor(np.asarray(v), dtype=like.dtype, device=like.device)
    with torch.no_grad():
        for torch_proj, keras_proj in _projections(torch_layer, keras_layer):
            values = keras_proj.get_weights()
            torch_proj.weight.copy_(as_tensor(values[0], torch_proj.weight).T)
            if torch_proj.bias is not None:
                torch_proj.bias.copy_(as_tensor(values[1], torch_proj.bias))
        if isinstance(torch_layer, torch_attention.SuperAttention):
            torch_layer.wa_weight.copy_(as_tensor(keras_layer.wa_weight.numpy(), torch_layer.wa_weight))
            if torch_layer.wa_bias is not None:
                torch_layer.wa_bias.copy_(as_tensor(keras_layer.wa_bias.numpy(), torch_layer.wa_bias))
