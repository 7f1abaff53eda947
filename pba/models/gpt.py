"""A character-level GPT (decoder-only transformer, nanoGPT-like) whose attention is any pba variant.

Token + learned position embedding -> ``n_layer`` pre-LN blocks
``x = x + Dropout(attn(LN(x), is_causal=True))``, ``x = x + MLP(LN(x))`` (MLP: ``4 C`` GELU) ->
final LayerNorm -> linear head, one logit per vocabulary entry at every position.

The model follows nanoGPT (Karpathy, ``model.py``) in shapes, initialisation and weight decay, so
that with ``variant="standard"`` it is the same function family with the same initial
distribution, and the other variants differ only in the lines the paper changes.
``B`` is the batch, ``T`` the length (at most ``block_size``), ``C = n_embd``, ``V = vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_positive_int, fields_of
from ..attention import VARIANTS, KVCache, SuperAttention, make_attention

#: Whether a tensor is a ``torch.func.vmap`` wrapper (functorch's own test; absent: never). The id
#: range check reads values, which a vmapped tensor cannot give.
_is_vmapped = getattr(torch._C._functorch, "is_batchedtensor", lambda tensor: False)

__all__ = ["GPTArchitecture", "GPTConfig", "GPTBlock", "GPT", "generate", "init_causal_wa"]


@dataclass(frozen=True, kw_only=True)
class GPTArchitecture:
    """Every choice of :class:`GPT` that depends neither on the data nor on the attention variant.

    Every field is keyword-only, here and in the classes that extend it, so that a subclass adding
    fields cannot shift a positional argument onto another field.

    :class:`GPTConfig` adds the two that do (``vocab_size``, ``variant``); an experiment's settings
    (:class:`pba.experiments.shakespeare.ShakespeareSettings`) add the training protocol.

    Attributes:
        block_size: the context length ``l``: at most this many tokens per sequence; also the size
            of super attention's ``W^A`` (``l x l``) and of the position table.
        n_layer, n_head, n_embd: depth, heads per attention layer, width ``C`` (``n_head | C``).
        dropout: on the embeddings, the attention weights, and both residual branches (training).
        bias: a bias in every linear layer and LayerNorm (as GPT-2 and the paper's counts); the head
            never has one (nanoGPT), and super's ``W^A`` has none (the paper's equations).
        tie_weights: the head shares the token embedding's ``V x C`` matrix (default, as nanoGPT
            and GPT-2). It removes the same ``V C`` parameters (8,320 at ``V = 65``, ``C = 128``)
            from every variant, so the differences in parameters between variants (the attention's
            ``W^K``, ``W^V`` and ``W^A``) are unchanged; only their ratio to the total grows a little.
            Tying keeps the model identical to the nanoGPT baseline it is compared with.
        wa_init: how super attention's ``W^A`` starts, one of :data:`WA_INITS`. The paper is silent;
            ``"random"`` (default) follows the reference reimplementation's Xavier init, made causal
            (:func:`init_causal_wa`); ``"identity"`` starts super exactly as efficient attention.
    """

    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    wa_init: str = "random"

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.wa_init not in WA_INITS:
            raise ValueError(f"wa_init must be one of {WA_INITS}, got {self.wa_init!r}")

    def architecture(self) -> dict[str, object]:
        """This object's :class:`GPTArchitecture` fields (also of a subclass), by name."""
        return fields_of(GPTArchitecture, self)


@dataclass(frozen=True, kw_only=True)
class GPTConfig(GPTArchitecture):
    """Every choice of :class:`GPT`: its :class:`GPTArchitecture`, the data's vocabulary, the variant.

    Attributes:
        vocab_size: ``V``, the number of token ids (65 characters for Tiny Shakespeare).
        variant: the attention, one of :data:`pba.VARIANTS`.
    """

    vocab_size: int
    variant: str = "standard"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("vocab_size", self.vocab_size)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")


#: How super attention's ``W^A`` starts: ``"random"`` (:func:`init_causal_wa`, the reference's
#: Xavier rescaled per causal row) or ``"identity"`` (``W^A = I``: super starts as efficient attention).
WA_INITS = ("random", "identity")


class MLP(nn.Module):
    """``C -> 4C -> GELU -> C``, then dropout (nanoGPT's ``c_fc`` and ``c_proj``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # a residual projection
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class GPTBlock(nn.Module):
    """A pre-LN decoder block: causal attention of one variant, then the MLP, both residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        # Super's W^A is block_size x block_size; is_causal=True in forward makes it act as tril(W^A).
        self.attn = make_attention(
            config.variant,
            config.n_embd,
            config.n_head,
            context_length=config.block_size,
            bias=config.bias,
            dropout=config.dropout,
        )
        self.attn_dropout = nn.Dropout(config.dropout)  # nanoGPT's resid_dropout
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn_dropout(self.attn(self.ln_1(x), is_causal=True))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)

    def decode(self, x: Tensor, cache: KVCache) -> Tensor:
        """:meth:`forward` for ``x`` ``(B, n, C)``, the positions after those in ``cache`` (which grows)."""
        x = x + self.attn_dropout(self.attn.decode(self.ln_1(x), cache))  # (B, n, C)
        return x + self.mlp(self.ln_2(x))  # (B, n, C)


def init_causal_wa(wa: Tensor) -> Tensor:
    r"""Fill ``W^A`` (``l x l``) for causal use: row ``t`` uniform with fan-in ``t + 1``, zero above.

    The attention layer's own init is Xavier-uniform over the full matrix (variance ``1/l`` per
    entry, as the reference reimplementation). Causal use keeps only the ``t + 1`` entries of row
    ``t`` on or below the diagonal, so row ``t`` of ``W^A X`` would have variance ``(t+1)/l`` times
    that of ``X``: the first token's value would be 8 times smaller (in std) than the last one's at
    ``l = 64``. Here entry ``(t, j <= t)`` is ``U(-a_t, a_t)`` with ``a_t = sqrt(3 / (t+1))``
    (variance ``1/(t+1)``), Xavier's rule applied to each row's real fan-in, so every row of
    ``W^A X`` starts with the scale of ``X``, the scale of efficient attention's values ``X_i``.
    The entries above the diagonal are set to zero: causal use never reads them (their gradient is
    zero), so the stored matrix is the matrix that acts.
    """
    length = wa.shape[-1]
    with torch.no_grad():
        bound = torch.sqrt(3.0 / torch.arange(1, length + 1, dtype=wa.dtype, device=wa.device))  # (l,)
        wa.uniform_(-1.0, 1.0).mul_(bound[:, None]).tril_()  # (l, l), row t scaled by a_t
    return wa


class GPT(nn.Module):
    """Decoder-only transformer: ids ``(B, T)`` -> next-token logits ``(B, T, V)``.

    Initialisation (nanoGPT): every ``nn.Linear`` and ``nn.Embedding`` weight ``N(0, 0.02)``, biases
    zero, LayerNorms one/zero, and the residual projections (attention's ``W^O`` and the MLP's
    ``c_proj``) ``N(0, 0.02 / sqrt(2 n_layer))``. This overrides the attention layers' own init of
    ``W^Q, W^K, W^V, W^O`` (Xavier), so a standard-variant GPT starts exactly as nanoGPT does.
    Super's ``W^A`` is not a ``Linear``; by default it gets :func:`init_causal_wa` (the layer's
    Xavier init rescaled per causal row), not ``N(0, 0.02)``, which would shrink its values to a few
    percent of efficient attention's; ``wa_init="identity"`` starts it at ``I`` instead, so a super
    GPT starts as an efficient one.

    With ``tie_weights`` (default) the head is the token embedding; see :class:`GPTArchitecture`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)  # (V, C)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)  # (l, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # (V, C)
        self._init_weights()
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight  # one (V, C) matrix, stored once

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)
            if isinstance(block.attn, SuperAttention):
                if self.config.wa_init == "identity":
                    nn.init.eye_(block.attn.wa_weight)
                else:
                    init_causal_wa(block.attn.wa_weight)

    def check_ids(self, ids: Tensor, name: str = "ids") -> None:
        """A ``ValueError`` naming ``name`` unless ``ids`` is int ``(B, T)``, ``1 <= T <= block_size``, in range."""
        cfg = self.config
        if not isinstance(ids, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 or int32 tensor of token ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{name} must have shape (batch, length) with length >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > cfg.block_size:
            raise ValueError(
                f"{name} must have at most block_size={cfg.block_size} tokens, got length {ids.shape[1]}"
            )
        # The range check reads values, which torch.func.vmap (stacked replicas) cannot; the
        # embedding's own index check still guards that case.
        if ids.numel() and not _is_vmapped(ids) and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"{name} must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids ``(B, T)``, ``T <= block_size`` -> logits ``(B, T, V)``; position ``t`` reads ids ``<= t``."""
        self.check_ids(ids)
        x = self._embed(ids, start=0)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.ln_f(x))  # (B, T, V)

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        """Token plus position embedding of ``ids`` ``(B, n)`` at positions ``start .. start + n - 1``."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)  # (n,)
        return self.drop(self.tok_emb(ids) + self.pos_emb(positions))  # (B, n, C)

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`pba.attention.KVCache` per block, for :meth:`decode`."""
        return [KVCache() for _ in self.blocks]

    def decode(self, ids: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits ``(B, n, V)`` for ids ``(B, n)`` that continue the sequence held in ``caches``.

        ``caches`` (from :meth:`new_caches`, one per block) hold the keys and values of the ``t``
        earlier positions and grow by ``n``; the logits equal, up to rounding, the last ``n``
        positions of :meth:`forward` on the whole sequence. Positions are absolute, so the sequence
        may not grow past ``block_size``: beyond it, start again from the last ``block_size`` ids.
        """
        self.check_ids(ids)
        if (
            not isinstance(caches, list)
            or len(caches) != len(self.blocks)
            or not all(isinstance(cache, KVCache) for cache in caches)
        ):
            raise ValueError(f"caches must be a list of {len(self.blocks)} KVCache (model.new_caches()), got {caches!r:.80}")
        if len({cache.length for cache in caches}) != 1:
            raise ValueError(f"caches must all hold the same positions, got lengths {[c.length for c in caches]}")
        start, length = caches[0].length, ids.shape[1]
        if start and caches[0].keys.shape[0] != ids.shape[0]:
            raise ValueError(f"ids has batch size {ids.shape[0]} but the caches hold {caches[0].keys.shape[0]} sequences")
        if start + length > self.config.block_size:
            raise ValueError(
                f"the sequence would reach {start + length} positions, more than block_size="
                f"{self.config.block_size}; decode the last block_size ids into fresh caches instead"
            )
        return self._decode(ids, caches, start)

    def _decode(self, ids: Tensor, caches: list[KVCache], start: int) -> Tensor:
        """:meth:`decode` without its checks, for callers that have made them (:func:`generate`)."""
        saved = [(cache.keys, cache.values, cache.layer) for cache in caches]
        try:
            x = self._embed(ids, start)  # (B, n, C)
            for block, cache in zip(self.blocks, caches):
                x = block.decode(x, cache)  # (B, n, C)
        except BaseException:  # a failure in any block (or an interrupt) leaves every cache as it was
            for cache, (keys, values, layer) in zip(caches, saved):
                cache.keys, cache.values, cache.layer = keys, values, layer
            raise
        return self.head(self.ln_f(x))  # (B, n, V)


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` ``(B, T0)``: ``(B, T0 + n)``.

    Each step takes the last position's logits, divides them by ``temperature``, keeps the
    ``top_k`` largest (``top_k=1`` is greedy decoding) and samples with
    ``torch.multinomial(generator=generator)``, so a seeded generator gives the same text every time.
    The model runs in eval mode (no dropout); its mode is restored afterwards.

    With ``use_cache`` (default) the prompt is run once and every later step feeds only the newest
    token, reusing each layer's keys and values (:meth:`GPT.decode`,
    :class:`pba.attention.KVCache`). That holds for super attention too: earlier value rows never
    change (``W^A`` acts lower-triangular), and a new row ``sum_{m <= t} W^A[t, m] x_m`` is mixed
    from the cached keys, which are its inputs. Positions are absolute, so once the text outgrows ``block_size`` every step
    runs the last ``block_size`` tokens through :meth:`GPT.forward`, as ``use_cache=False`` always
    does. Both give the same logits up to rounding, so rarely (a near tie) a different token.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a pba.models.GPT, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0 (use top_k=1 for greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    block_size = model.config.block_size
    model.check_ids(idx[:, -block_size:] if isinstance(idx, Tensor) and idx.dim() == 2 else idx, name="idx")
    was_training = model.training
    model.eval()
    try:
        caches = None
        for _ in range(max_new_tokens):
            if use_cache and idx.shape[1] <= block_size:
                # idx was checked above and every sampled id lies in [0, V): decode's checks would only repeat
                if caches is None:  # the prompt, once
                    caches = model.new_caches()
                    logits = model._decode(idx, caches, start=0)[:, -1, :]  # (B, V)
                else:  # only the newest token
                    logits = model._decode(idx[:, -1:], caches, start=idx.shape[1] - 1)[:, -1, :]
            else:
                logits = model(idx[:, -block_size:])[:, -1, :]  # (B, V)
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # (B, V)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id.to(idx.dtype)), dim=1)  # (B, T0 + step + 1)
    finally:
        model.train(was_training)
    return idx
