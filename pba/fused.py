"""A fused CPU training step for :class:`pba.models.IMDBClassifier`: the same function, written out.

The model in :mod:`pba.models` is the specification. On a CPU its training step is dominated not
by arithmetic but by the glue between some two hundred small PyTorch operators (see
``benchmarks/imdb_floor.py``). :class:`FusedIMDBStep` computes the same loss and the same
gradients in one call into a small C++ extension (``pba/csrc/imdb_step.cpp``, compiled on first
use with the system's C++ compiler): every matrix product, the learned ones and the four of each
(review, head) pair's attention, goes through one small register-tiled matrix multiply, and the
softmax, the layer norms, dropout, pooling and the loss are plain loops over data that fits in
the L1 cache, with the backward pass derived by hand.

``tests/test_fused.py`` checks loss, logits and every gradient against autograd through the
PyTorch model, for every variant and option, given the same dropout masks. Dropout draws its
masks from a counter-based hash of ``(seed, step, site, index)``, so a fused run is deterministic
but does not draw the masks that ``torch.nn.Dropout`` would: its numbers differ from an autograd
run's in the way two seeds do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from .attention import EfficientAttention, OptimisedAttention, StandardAttention, SuperAttention
from .models import IMDBClassifier

__all__ = ["FusedAdam", "FusedIMDBStep", "fused_unsupported_reason", "load_extension"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "imdb_step.cpp"
_VARIANT_CODES: dict[type, int] = {
    StandardAttention: 0,
    OptimisedAttention: 1,
    EfficientAttention: 2,
    SuperAttention: 3,
}


@functools.lru_cache(maxsize=None)
def load_extension():  # noqa: ANN201 (a compiled module)
    """Compile (once per machine, cached by torch) and import the C++ step."""
    from torch.utils.cpp_extension import load

    return load(
        name="pba_imdb_step",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno"],
        verbose=False,
    )


def fused_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why :class:`FusedIMDBStep` cannot train ``model``, or ``None`` if it can."""
    if not isinstance(model, IMDBClassifier):
        return f"model must be a pba.models.IMDBClassifier, got {type(model).__name__}"
    if len(model.blocks) != 1:
        return f"one encoder block only, got {len(model.blocks)}"
    block = model.blocks[0]
    attention = block.attention
    if type(attention) not in _VARIANT_CODES:
        return f"attention must be one of pba's four variants, got {type(attention).__name__}"
    if attention.dropout != 0.0:
        return f"attention dropout must be 0, got {attention.dropout}"
    if not attention.bias:
        return "the attention's projections must have biases (bias=True)"
    if isinstance(attention, SuperAttention) and attention.wa_sharing != "layer":
        return f"super attention's W^A must be shared across heads (wa_sharing='layer'), got {attention.wa_sharing!r}"
    rates = {block.dropout1.p, block.dropout2.p, model.head[0].p, model.head[3].p}
    if len(rates) != 1:
        return f"every dropout must have the same rate, got {sorted(rates)}"
    if block.norm1.eps != block.norm2.eps:
        return "both layer norms must have the same eps"
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 or param.device.type != "cpu":
            return f"parameters must be float32 on the CPU, got {name}: {param.dtype} on {param.device}"
    return None


class FusedIMDBStep:
    """Forward, loss and backward of one training step of ``model``, in one C++ call.

    After ``step(ids, labels)`` every parameter's ``.grad`` holds the gradient of the mean binary
    cross-entropy (the tensors are reused: do not set them to ``None`` between steps; the step
    overwrites them). Then any optimiser steps as usual. In ``model.eval()`` mode dropout is off.

    Args:
        model: an :class:`~pba.models.IMDBClassifier` that :func:`fused_unsupported_reason` accepts.
        seed: the dropout masks' seed; step ``t`` of seed ``s`` always draws the same masks.
    """

    def __init__(self, model: IMDBClassifier, *, seed: int = 0) -> None:
        reason = fused_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FusedIMDBStep cannot train this model: {reason}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.model = model
        self.seed = seed
        self.steps_taken = 0
        self._extension = load_extension()
        block, attention = model.blocks[0], model.blocks[0].attention
        none = torch.empty(0)

        def weight_and_bias(layer: torch.nn.Module | None) -> list[Tensor]:
            return [none, none] if layer is None else [layer.weight, layer.bias]

        wa = [none, none]
        if isinstance(attention, SuperAttention):
            wa = [attention.wa_weight, none if attention.wa_bias is None else attention.wa_bias]
        self._params: list[Tensor] = [
            model.token_embedding.weight,
            model.position_embedding.weight,
            *weight_and_bias(attention.q_proj),
            *weight_and_bias(attention.k_proj),
            *weight_and_bias(attention.v_proj),
            *weight_and_bias(attention.out_proj),
            *wa,
            *weight_and_bias(block.ffn[0]),
            *weight_and_bias(block.ffn[2]),
            *weight_and_bias(block.norm1),
            *weight_and_bias(block.norm2),
            *weight_and_bias(model.head[1]),
            *weight_and_bias(model.head[4]),
        ]
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()
        self._previous_ids = torch.empty(0, dtype=torch.int64)  # embedding rows the last step wrote
        self._grads = [none if p.numel() == 0 else p.grad for p in self._params]
        self._options = (  # the model's settings, in the order train_step and train_epoch take them
            _VARIANT_CODES[type(attention)],
            attention.n_heads,
            attention.softmax_over == "queries",
            model.padding_mask,
            model.masked_pooling,
            model.pad_id,
            block.norm1.eps,
        )

    @torch.no_grad()
    def step(self, ids: Tensor, labels: Tensor, *, return_masks: bool = False) -> tuple[Tensor, ...]:
        """Loss ``()`` and logits ``(B,)``; with ``return_masks`` also the four dropout scale tensors
        (0 or ``1 / (1 - p)``: after attention ``(B*L, d)``, after the FFN ``(B*L, d)``, on the
        pooled vector ``(B, d)`` and on the head's hidden layer ``(B, 6)``)."""
        self.model.check_ids(ids)
        if labels.shape != ids.shape[:1]:
            raise ValueError(f"labels must have shape ({ids.shape[0]},), got {tuple(labels.shape)}")
        for param, grad in zip(self._params, self._grads):
            if param.numel() and param.grad is not grad:
                raise RuntimeError("a parameter's .grad was replaced; FusedIMDBStep writes into its own tensors")
        dropout = self.model.blocks[0].dropout1.p if self.model.training else 0.0
        ids = ids.to(torch.int64).contiguous()
        out = self._extension.train_step(
            ids,
            self._previous_ids,
            labels.to(torch.float32).contiguous(),
            self._params,
            self._grads,
            *self._options,
            dropout,
            self.seed,
            self.steps_taken,
            return_masks,
            True,
        )
        self.steps_taken += 1
        self._previous_ids = ids
        return tuple(out)

    @torch.no_grad()
    def train_epoch(
        self, ids: Tensor, labels: Tensor, order: Tensor, batch_size: int, optimizer: FusedAdam, *, threshold: float = 0.0
    ) -> tuple[float, int]:
        """One epoch in one call: :meth:`step` and ``optimizer.step()`` for each batch of ``order``.

        The same calls as that Python loop, in C++, so the same numbers. Returns the sum of the
        batches' mean losses times their sizes and the count of correct predictions
        (``logit > threshold`` against ``label > 0.5``), as :func:`pba.train.fit` accumulates them.
        """
        if optimizer.fused_step is not self:
            raise ValueError("optimizer must be a FusedAdam over this FusedIMDBStep")
        self.model.check_ids(ids)
        if labels.shape != ids.shape[:1]:
            raise ValueError(f"labels must have shape ({ids.shape[0]},), got {tuple(labels.shape)}")
        if not self.model.training:
            raise ValueError("train_epoch needs the model in training mode (model.train())")
        loss_sum, correct, last_ids = self._extension.train_epoch(
            ids.to(torch.int64).contiguous(), labels.to(torch.float32).contiguous(), order.to(torch.int64).contiguous(),
            batch_size,
            self._previous_ids, self._params, self._grads, optimizer.exp_avg, optimizer.exp_avg_sq,
            *self._options, self.model.blocks[0].dropout1.p, self.seed, self.steps_taken,
            optimizer.steps_taken, optimizer.lr, optimizer.betas[0], optimizer.betas[1], optimizer.eps, threshold,
        )
        batches = -(-len(order) // batch_size)
        self.steps_taken += batches
        optimizer.steps_taken += batches
        self._previous_ids = last_ids
        return loss_sum, correct

    @torch.no_grad()
    def logits(self, ids: Tensor, *, batch_size: int = 256) -> Tensor:
        """The model's logits ``(B,)`` in eval mode (no dropout, no gradients), ``batch_size`` at a time."""
        self.model.check_ids(ids)
        ids = ids.to(torch.int64)
        none = torch.empty(0)
        chunks = [
            self._extension.train_step(
                ids[start : start + batch_size].contiguous(), self._previous_ids, none, self._params, self._grads,
                *self._options, 0.0, self.seed, self.steps_taken, False, False,
            )[0]
            for start in range(0, len(ids), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)


class FusedAdam:
    """Plain Adam over every parameter of a :class:`FusedIMDBStep`'s model, in one C++ call.

    The update is ``torch.optim.Adam``'s (no weight decay, no AMSGrad), checked against it in
    ``tests/test_fused.py``. The token embedding's gradient is zero outside the rows of the last
    batch, so those rows are updated with ``g = 0`` without reading the gradient: every row still
    moves (its moments decay and its weight follows them, as in any dense Adam), only the memory
    traffic shrinks. Call :meth:`step` after each :meth:`FusedIMDBStep.step`.
    """

    def __init__(
        self, fused_step: FusedIMDBStep, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.fused_step = fused_step
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps_taken = 0
        self.exp_avg = [torch.zeros_like(p) for p in fused_step._params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in fused_step._params]

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter from its ``.grad`` (the last fused step's gradients)."""
        self.steps_taken += 1
        step = self.fused_step
        step._extension.adam_step(
            step._params, step._grads, self.exp_avg, self.exp_avg_sq, step._previous_ids,
            self.steps_taken, self.lr, self.betas[0], self.betas[1], self.eps,
        )
