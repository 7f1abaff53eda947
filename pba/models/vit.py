"""A small Vision Transformer (Dosovitskiy et al., 2021) whose attention is any of :data:`pba.VARIANTS`.

Images ``(B, C, H, W)`` -> non-overlapping ``p x p`` patches ``(B, N, C*p*p)`` -> linear patch
embedding + learned position embedding -> ``n_layers`` pre-LN encoder blocks
``x + attn(ln(x))``, ``x + mlp(ln(x))`` -> final LayerNorm -> pooling -> linear head -> logits.

Images have a fixed size, so the number of tokens is fixed too: the setting the paper calls ideal
for super attention, whose ``W^A`` is an ``n_tokens x n_tokens`` matrix over the token axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, fields_of
from ..attention import VARIANTS, StandardAttention, make_attention

__all__ = ["POOLINGS", "ViTArchitecture", "ViTConfig", "ViTBlock", "ViT", "patchify", "unpatchify"]

POOLINGS: tuple[str, ...] = ("mean", "cls")


def _check_patch(patch: object, height: int, width: int) -> int:
    check_positive_int("patch", patch)
    if height % patch or width % patch:
        raise ValueError(f"patch must divide the image size {height}x{width}, got patch={patch}")
    return patch


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W) -> (B, N, C*patch*patch)``, ``N = (H/patch) * (W/patch)``.

    Patches are numbered row by row (left to right, then top to bottom); each patch vector lists
    channel 0's ``patch x patch`` pixels row by row, then channel 1's, and so on.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (batch, channels, height, width), got {got}")
    batch, channels, height, width = images.shape
    p = _check_patch(patch, height, width)
    rows, cols = height // p, width // p
    x = images.reshape(batch, channels, rows, p, cols, p)  # (B, C, rows, p, cols, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
    return x.reshape(batch, rows * cols, channels * p * p)  # (B, N, C*p*p)


def unpatchify(patches: Tensor, patch: int, image_size: int | tuple[int, int], channels: int) -> Tensor:
    """The exact inverse of :func:`patchify`: ``(B, N, C*patch*patch) -> (B, C, H, W)``."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for name, value in (("image_size", height), ("image_size", width), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int (or a pair of them), got {value!r}")
    p = _check_patch(patch, height, width)
    rows, cols = height // p, width // p
    expected = (rows * cols, channels * p * p)
    if not isinstance(patches, Tensor) or patches.dim() != 3 or tuple(patches.shape[1:]) != expected:
        got = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
        raise ValueError(
            f"patches must have shape (batch, N, C*patch*patch) = (batch, {expected[0]}, {expected[1]}) "
            f"for {channels}x{height}x{width} images and patch={p}, got {got}"
        )
    batch = patches.shape[0]
    x = patches.reshape(batch, rows, cols, channels, p, p)  # (B, rows, cols, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, rows, p, cols, p)
    return x.reshape(batch, channels, height, width)  # (B, C, H, W)


@dataclass(frozen=True, kw_only=True)
class ViTArchitecture:
    """Every choice of :class:`ViT` that depends neither on the images nor on the attention variant.

    Every field is keyword-only, here and in the classes that extend it, so that a subclass adding
    fields cannot shift a positional argument onto another field.

    :class:`ViTConfig` adds those that do; an experiment's settings
    (:class:`pba.experiments.mnist.MnistSettings`) add the training protocol.

    Attributes:
        patch_size: side of the square patches; must divide the image size. On 28x28 images, 7 gives
            16 tokens and 4 gives 49.
        d_model, n_layers, n_heads: width, depth, heads; ``n_heads`` must divide ``d_model``.
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * d_model``.
        pooling: how the tokens become one vector. ``"mean"`` (default) averages the patch tokens,
            so the sequence attention sees is exactly the ``N`` patches and super attention's
            ``W^A`` is ``N x N``, every row and column a patch position. ``"cls"`` prepends a learned
            class token and reads it out, as the original ViT: the length becomes ``N + 1`` and
            ``W^A`` gets a row and a column (index 0) that belong to no patch.
        dropout: dropout after the embedding and on each residual branch (0 by default: the runs
            are a few epochs long and do not overfit).
    """

    patch_size: int = 7
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 2
    pooling: str = "mean"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("patch_size", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def architecture(self) -> dict[str, Any]:
        """This object's :class:`ViTArchitecture` fields (also of a subclass), by name."""
        return fields_of(ViTArchitecture, self)


@dataclass(frozen=True, kw_only=True)
class ViTConfig(ViTArchitecture):
    """Every choice of :class:`ViT`: its :class:`ViTArchitecture`, the images, the variant.

    Attributes:
        image_size: side of the square input images (28 for MNIST).
        channels: input channels (1 for MNIST).
        n_classes: outputs of the head.
        variant: the attention variant, one of :data:`pba.VARIANTS`.
        attention_options: passed to :func:`pba.attention.make_attention` (``bias``, ``softmax_over``,
            ``wa_sharing``, ``wa_bias``, ``fused``...). ``context_length`` is set by the model.
    """

    image_size: int = 28
    channels: int = 1
    n_classes: int = 10
    variant: str = "standard"
    attention_options: dict[str, Any] = field(default_factory=dict, hash=False)  # a dict cannot be hashed

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("image_size", "channels", "n_classes"):
            check_positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size must divide image_size={self.image_size}, got patch_size={self.patch_size}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.attention_options, dict):
            raise ValueError(f"attention_options must be a dict, got {type(self.attention_options).__name__}")
        if "context_length" in self.attention_options:
            raise ValueError(
                "attention_options must not set context_length: the model sets it to n_tokens "
                f"({self.n_tokens})"
            )

    @property
    def n_patches(self) -> int:
        """``N = (image_size / patch_size)^2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """The length attention sees (``N``, plus one with a class token)."""
        return self.n_patches + (self.pooling == "cls")

    @property
    def patch_dim(self) -> int:
        """The number of values in one patch, ``channels * patch_size^2``."""
        return self.channels * self.patch_size**2


class MLP(nn.Module):
    """``Linear -> GELU -> Linear``, ``d_model -> mlp_ratio * d_model -> d_model``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden)
        self.proj = nn.Linear(hidden, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C)


class ViTBlock(nn.Module):
    """A pre-LN encoder block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attention: StandardAttention = make_attention(
            config.variant,
            config.d_model,
            config.n_heads,
            context_length=config.n_tokens,
            **config.attention_options,
        )
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, T, C) -> (B, T, C)``; with ``need_weights`` also the attention ``(B, h, T, T)``."""
        weights = None
        if need_weights:
            attended, weights = self.attention(self.ln_1(x), need_weights=True)
        else:
            attended = self.attention(self.ln_1(x))
        x = x + self.dropout(attended)  # (B, T, C)
        x = x + self.dropout(self.mlp(self.ln_2(x)))  # (B, T, C)
        return (x, weights) if need_weights else x


class ViT(nn.Module):
    """Images ``(B, C, H, W)`` float -> logits ``(B, n_classes)``.

    ``model.blocks[i].attention`` is block ``i``'s attention layer (for super attention its
    ``wa_weight`` is ``W^A``, ``(n_tokens, n_tokens)``); :meth:`attention_weights` returns every
    block's attention maps.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**overrides)
        elif overrides:
            raise ValueError(f"pass either config or keyword overrides, got both (overrides {sorted(overrides)})")
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.patch_embedding = nn.Linear(config.patch_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.pooling == "cls" else None
        self.position_embedding = nn.Parameter(torch.zeros(1, config.n_tokens, d))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.n_classes)

    @property
    def n_tokens(self) -> int:
        """The length attention sees (``N`` patches, plus one with a class token)."""
        return self.config.n_tokens

    @property
    def attention_layers(self) -> list[StandardAttention]:
        """Each block's attention layer, in order."""
        return [block.attention for block in self.blocks]

    def check_images(self, images: Tensor) -> None:
        """Raise unless ``images`` is a float ``(B, channels, image_size, image_size)`` tensor."""
        c = self.config
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a floating-point tensor (normalised pixels), got dtype {images.dtype}"
            )
        expected = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (batch, {c.channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(images.shape)}"
            )

    def embed(self, images: Tensor) -> Tensor:
        """Images -> the tokens the first block reads, ``(B, T, C)`` with ``T = n_tokens``."""
        self.check_images(images)
        x = self.patch_embedding(patchify(images, self.config.patch_size))  # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, C)
        return self.dropout(x + self.position_embedding)  # (B, T, C)

    def pool(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, C)``: the class token, or the mean over the patch tokens."""
        return x[:, 0] if self.config.pooling == "cls" else x.mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` float -> logits ``(B, n_classes)``."""
        x = self.embed(images)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.pool(self.ln_f(x)))  # (B, n_classes)

    @torch.no_grad()
    def attention_weights(self, images: Tensor) -> list[Tensor]:
        """Every block's attention weights ``(B, h, T, T)`` for ``images`` (in the current mode).

        With ``"cls"`` pooling token 0 is the class token and token ``1 + k`` is patch ``k``.
        """
        x = self.embed(images)
        maps = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            maps.append(weights)
        return maps
