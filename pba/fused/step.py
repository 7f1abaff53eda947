"""The Python side of the fused step: find the model's parts by name, build the C++ engine, drive it.

``csrc/imdb_step.cpp`` holds the step's layout (``ParameterTensors``: one slot per parameter,
named) and its layers. This module is the one place that knows where
:class:`pba.models.imdb.IMDBClassifier` keeps each part: :data:`PARAMETER_SLOTS` maps the model's own
parameter names (its ``state_dict`` keys) to the C++ slots, and :data:`MODULE_KINDS` names the
parameter-free modules the step stands in for. :func:`imdb_parts` reads them and raises a
``ValueError`` naming any part that is missing or unknown, so a model whose parts moved or were
renamed is refused rather than misread. Which projections the attention learns comes from the
layer itself (``learns_keys``, ``learns_values``, ``learns_token_mixing``), never from a table
of variants.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attention import EfficientAttention, OptimisedAttention, StandardAttention, SuperAttention
from ..models import IMDBClassifier
from ..train import BinaryClassification, Engine, RoundStats, Task, TrainConfig

__all__ = [
    "FusedAdam",
    "FusedEngine",
    "FusedIMDBStep",
    "MODULE_KINDS",
    "PARAMETER_SLOTS",
    "fused_unsupported_reason",
    "imdb_parts",
    "load_extension",
    "toolchain_missing",
]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "imdb_step.cpp"

#: The model's parameters, by their names in ``model.named_parameters()``, and the slot of the C++
#: step's ``ParameterTensors`` each one fills. ``k``/``v`` projections exist where the attention
#: learns them, ``wa_*`` in super attention (its bias optionally).
PARAMETER_SLOTS: dict[str, str] = {
    "token_embedding.weight": "token_embedding",
    "position_embedding.weight": "position_embedding",
    "blocks.0.attention.q_proj.weight": "wq",
    "blocks.0.attention.q_proj.bias": "bq",
    "blocks.0.attention.k_proj.weight": "wk",
    "blocks.0.attention.k_proj.bias": "bk",
    "blocks.0.attention.v_proj.weight": "wv",
    "blocks.0.attention.v_proj.bias": "bv",
    "blocks.0.attention.out_proj.weight": "wo",
    "blocks.0.attention.out_proj.bias": "bo",
    "blocks.0.attention.wa_weight": "wa",
    "blocks.0.attention.wa_bias": "wa_bias",
    "blocks.0.ffn.0.weight": "fc1_weight",
    "blocks.0.ffn.0.bias": "fc1_bias",
    "blocks.0.ffn.2.weight": "fc2_weight",
    "blocks.0.ffn.2.bias": "fc2_bias",
    "blocks.0.norm1.weight": "ln1_weight",
    "blocks.0.norm1.bias": "ln1_bias",
    "blocks.0.norm2.weight": "ln2_weight",
    "blocks.0.norm2.bias": "ln2_bias",
    "head.1.weight": "head1_weight",
    "head.1.bias": "head1_bias",
    "head.4.weight": "head2_weight",
    "head.4.bias": "head2_bias",
}

#: The modules the step reads settings from or computes in their place, by name, with their kind.
#: Every module inside ``blocks.0.ffn`` and ``head`` must be one of these.
MODULE_KINDS: dict[str, type[nn.Module]] = {
    "blocks.0.attention": StandardAttention,
    "blocks.0.ffn.0": nn.Linear,
    "blocks.0.ffn.1": nn.ReLU,
    "blocks.0.ffn.2": nn.Linear,
    "blocks.0.norm1": nn.LayerNorm,
    "blocks.0.norm2": nn.LayerNorm,
    "blocks.0.dropout1": nn.Dropout,
    "blocks.0.dropout2": nn.Dropout,
    "head.0": nn.Dropout,
    "head.1": nn.Linear,
    "head.2": nn.ReLU,
    "head.3": nn.Dropout,
    "head.4": nn.Linear,
}

_ATTENTION_LAYERS = (StandardAttention, OptimisedAttention, EfficientAttention, SuperAttention)


def toolchain_missing() -> str | None:
    """Why the C++ step cannot be compiled here (no C++ compiler, or no ``ninja``), or ``None``."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; install g++ or set CXX)"
    if not is_ninja_available():
        return "no ninja, which torch compiles C++ extensions with (pip install ninja)"
    return None


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


def _module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name`` of the kind :data:`MODULE_KINDS` says, or a ``ValueError``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r}") from None
    kind = MODULE_KINDS[name]
    if not isinstance(module, kind):
        raise ValueError(f"the model's {name!r} must be a {kind.__name__}, got {type(module).__name__}")
    return module


def imdb_parts(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by the C++ step's slot names (:data:`PARAMETER_SLOTS`).

    Raises a ``ValueError`` naming the part where a parameter the step needs is missing, where the
    model has a parameter the step does not know, or where a module of :data:`MODULE_KINDS` is
    missing or of another kind.
    """
    for name in MODULE_KINDS:
        _module(model, name)
    for name, _ in model.named_modules():
        if name.startswith(("blocks.0.ffn.", "head.")) and name not in MODULE_KINDS:
            raise ValueError(f"the fused step does not know the model's module {name!r}")
    attention = model.get_submodule("blocks.0.attention")
    absent = set()  # slots the attention layer has no parameter for
    if not attention.learns_keys:
        absent |= {"wk", "bk"}
    if not attention.learns_values:
        absent |= {"wv", "bv"}
    if not attention.learns_token_mixing:
        absent |= {"wa", "wa_bias"}
    elif getattr(attention, "wa_bias", None) is None:
        absent.add("wa_bias")
    params = dict(model.named_parameters())
    parts: dict[str, Tensor] = {}
    for name, slot in PARAMETER_SLOTS.items():
        if slot in absent:
            continue
        if name not in params:
            raise ValueError(f"the model has no parameter {name!r} (the fused step's {slot!r})")
        parts[slot] = params.pop(name)
    if params:
        raise ValueError(f"the fused step does not know the model's parameter(s) {sorted(params)}")
    return parts


def fused_unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`FusedIMDBStep` cannot train ``model``, or ``None`` if it can."""
    if not isinstance(model, IMDBClassifier):
        return f"model must be a pba.models.IMDBClassifier, got {type(model).__name__}"
    if len(model.blocks) != 1:
        return f"one encoder block only, got {len(model.blocks)}"
    attention = model.get_submodule("blocks.0.attention")
    if type(attention) not in _ATTENTION_LAYERS:
        return f"attention must be one of pba's four layers, got {type(attention).__name__}"
    if attention.dropout != 0.0:
        return f"attention dropout must be 0, got {attention.dropout}"
    if not attention.bias:
        return "the attention's projections must have biases (bias=True)"
    if attention.learns_token_mixing and attention.wa_sharing != "layer":
        return f"super attention's W^A must be shared across heads (wa_sharing='layer'), got {attention.wa_sharing!r}"
    try:
        imdb_parts(model)
    except ValueError as error:
        return str(error)
    rates = {_module(model, name).p for name, kind in MODULE_KINDS.items() if kind is nn.Dropout}
    if len(rates) != 1:
        return f"every dropout must have the same rate, got {sorted(rates)}"
    if _module(model, "blocks.0.norm1").eps != _module(model, "blocks.0.norm2").eps:
        return "both layer norms must have the same eps"
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 or param.device.type != "cpu":
            return f"parameters must be float32 on the CPU, got {name}: {param.dtype} on {param.device}"
    return None


def _options(model: IMDBClassifier, seed: int, extension) -> object:  # noqa: ANN001
    """The C++ ``Options``, read off the model's modules and attributes."""
    attention = model.get_submodule("blocks.0.attention")
    options = extension.Options()
    options.learns_keys = attention.learns_keys
    options.learns_values = attention.learns_values
    options.learns_token_mixing = attention.learns_token_mixing
    options.n_heads = attention.n_heads
    options.softmax_over_queries = attention.softmax_over == "queries"
    options.padding_mask = model.padding_mask
    options.masked_pooling = model.masked_pooling
    options.pad_id = model.pad_id
    options.layer_norm_eps = _module(model, "blocks.0.norm1").eps
    options.dropout = _module(model, "blocks.0.dropout1").p  # all equal (fused_unsupported_reason)
    options.seed = seed
    return options


class FusedIMDBStep:
    """Forward, loss and backward of one training step of ``model``, in one C++ call.

    After ``step(ids, labels)`` every parameter's ``.grad`` holds the gradient of the mean binary
    cross-entropy (the tensors are reused: do not set them to ``None`` between steps; the step
    overwrites them). Then any optimiser steps as usual. In ``model.eval()`` mode dropout is off.
    The C++ ``Model`` it holds owns the step's buffers (allocated for the largest batch seen).

    Args:
        model: an :class:`~pba.models.imdb.IMDBClassifier` that :func:`fused_unsupported_reason` accepts.
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
        extension = load_extension()
        parts = imdb_parts(model)
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()
        self._parts = parts
        self._grads = {slot: param.grad for slot, param in parts.items()}
        self._engine = extension.Model(parts, self._grads, _options(model, seed, extension))

    @property
    def steps_taken(self) -> int:
        """Training steps taken (each draws its own dropout masks)."""
        return self._engine.steps

    def _check(self, ids: Tensor, labels: Tensor | None = None) -> None:
        self.model.check_ids(ids)
        if labels is not None and labels.shape != ids.shape[:1]:
            raise ValueError(f"labels must have shape ({ids.shape[0]},), got {tuple(labels.shape)}")
        for slot, param in self._parts.items():
            if param.grad is not self._grads[slot]:
                raise RuntimeError("a parameter's .grad was replaced; FusedIMDBStep writes into its own tensors")

    @torch.no_grad()
    def step(self, ids: Tensor, labels: Tensor, *, return_masks: bool = False) -> tuple[Tensor, ...]:
        """Loss ``()`` and logits ``(B,)``; with ``return_masks`` also the four dropout scale tensors
        (0 or ``1 / (1 - p)``: after attention ``(B*L, d)``, after the FFN ``(B*L, d)``, on the
        pooled vector ``(B, d)`` and on the head's hidden layer ``(B, 6)``)."""
        self._check(ids, labels)
        out = self._engine.train_step(
            ids.to(torch.int64).contiguous(), labels.to(torch.float32).contiguous(), self.model.training, return_masks
        )
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
        if not self.model.training:
            raise ValueError("train_epoch needs the model in training mode (model.train())")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        full, rest = divmod(len(order), batch_size)
        return self._train(ids, labels, order, [batch_size] * full + ([rest] if rest else []), optimizer, threshold)

    def _train(
        self,
        ids: Tensor,
        labels: Tensor,
        order: Tensor,
        batch_sizes: list[int],
        optimizer: FusedAdam,
        threshold: float,
        lrs: Sequence[float] = (),
    ) -> tuple[float, int]:
        """Steps with dropout and Adam over consecutive batches of ``order``, in one C++ call."""
        if optimizer.fused_step is not self:
            raise ValueError("optimizer must be a FusedAdam over this FusedIMDBStep")
        self._check(ids, labels)
        with torch.no_grad():
            loss_sum, correct = load_extension().train_epoch(
                self._engine, optimizer._adam, ids.to(torch.int64).contiguous(), labels.to(torch.float32).contiguous(),
                order.to(torch.int64).contiguous(), batch_sizes, list(lrs), threshold,
            )
        return loss_sum, correct

    @torch.no_grad()
    def logits(self, ids: Tensor, *, batch_size: int = 256) -> Tensor:
        """The model's logits ``(B,)`` in eval mode (no dropout, no gradients), ``batch_size`` at a time."""
        self.model.check_ids(ids)
        ids = ids.to(torch.int64)
        chunks = [
            self._engine.forward(ids[start : start + batch_size].contiguous()) for start in range(0, len(ids), batch_size)
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
        self._adam = load_extension().Adam(fused_step._engine, lr, betas[0], betas[1], eps)

    @property
    def steps_taken(self) -> int:
        """Updates made."""
        return self._adam.steps

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter from its ``.grad`` (the last fused step's gradients)."""
        self._adam.step(self.fused_step._engine)


class FusedEngine(Engine):
    """The engine of :func:`pba.train.fit` for an IMDB classifier, in C++: a round is one call.

    A thin layer over :class:`FusedIMDBStep` and :class:`FusedAdam`. It trains a
    :class:`~pba.train.BinaryClassification` task with plain Adam (``config.optimizer="adam"``, no
    weight decay, no clipping; the schedule's rates are passed per step). Raises a ``ValueError``
    (the reason) for a model or config it cannot train.
    """

    replicas = 1

    def __init__(self, model: nn.Module, config: TrainConfig, *, seed: int) -> None:
        reason = fused_unsupported_reason(model)
        if reason is None and (config.optimizer != "adam" or config.weight_decay or config.grad_clip is not None):
            reason = (f"it runs plain Adam only, got optimizer={config.optimizer!r}, weight_decay={config.weight_decay}, "
                      f"grad_clip={config.grad_clip}")
        if reason is not None:
            raise ValueError(f"FusedEngine cannot train this model: {reason}")
        self.model = model
        self.fused_step = FusedIMDBStep(model, seed=seed)  # type: ignore[arg-type]
        self.optimizer = FusedAdam(self.fused_step, lr=config.lr, betas=config.betas, eps=config.eps)
        self.best: dict | None = None

    def train_round(self, task: Task, batches: Sequence[Tensor], lrs: Sequence[float]) -> RoundStats:
        """All the steps of one round in one C++ call, in training mode (dropout on)."""
        if not isinstance(task, BinaryClassification):
            raise ValueError(f"task must be a pba.train.BinaryClassification, got {type(task).__name__}")
        if not batches:
            raise ValueError("a round needs at least one batch")
        if len(lrs) != len(batches):
            raise ValueError(f"lrs must have one rate per batch ({len(batches)}), got {len(lrs)}")
        self.model.train()
        ids, labels = task.splits["train"]
        order = torch.cat([batch.reshape(-1) for batch in batches])
        sizes = [batch.numel() for batch in batches]
        loss_sum, correct = self.fused_step._train(ids, labels, order, sizes, self.optimizer, task.threshold, lrs)
        examples = sum(sizes)
        return RoundStats(torch.tensor([loss_sum], dtype=torch.float64), torch.tensor([correct]), examples, examples)

    def predict(self, inputs: Tensor) -> Tensor:
        """Eval-mode logits ``(1, B)`` (no dropout, no gradients)."""
        return self.fused_step.logits(inputs)[None]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def keep(self, replica: int) -> None:
        self.best = copy.deepcopy(self.model.state_dict())

    def restore(self) -> None:
        if self.best is not None:  # load_state_dict copies in place: the C++ step stays bound
            self.model.load_state_dict(self.best)
