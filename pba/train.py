"""One training loop for every task: a model (or a stack of replicas), a task, a config, an engine.

The loop (:func:`fit`) is the protocol and nothing more: draw the batches of a round (an epoch, or
a fixed number of steps) from a seeded generator, let the engine take a step on each, evaluate on
validation after the round, keep the round the task's metric prefers, evaluate that state once on
test. What differs between tasks is passed in, never branched on:

* a :class:`Task` says how to draw a round's batches, turn indices into ``(inputs, target)``,
  score a batch (loss, and the examples it gets right), and which validation metric selects;
  :class:`BinaryClassification` (IMDB), :class:`Classification` (MNIST) and
  :class:`LanguageModeling` (Tiny Shakespeare) are the book's three;
* an :class:`Engine` computes the steps: :class:`AutogradEngine` (the model's forward, PyTorch's
  backward, a ``torch.optim`` optimiser) by default, :class:`ReplicaEngine` for several seeds
  trained as one batched model, or any object with the same methods (``pba.fused.FusedEngine``,
  the IMDB classifier's step written in C++). The loop never imports a particular engine.

Everything an engine returns carries a leading replica axis ``R`` (1 for a single model), so the
same loop serves one model and a stack of them.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int

__all__ = [
    "TrainConfig",
    "RunResult",
    "Task",
    "BinaryClassification",
    "Classification",
    "LanguageModeling",
    "Engine",
    "RoundStats",
    "AutogradEngine",
    "ReplicaEngine",
    "make_optimizer",
    "learning_rate",
    "pick_device",
    "seed_everything",
    "evaluate",
    "fit",
]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple's MPS, then CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto' or a torch device name, got {device!r}") from error


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """How to train (defaults: the paper's IMDB setting, plain Adam at a constant rate).

    Attributes:
        epochs: rounds of training, each followed by a validation pass. A round is one pass over
            the training set, or the task's ``steps_per_round`` steps where it sets them.
        batch_size: examples per step.
        optimizer: ``"adam"`` or ``"adamw"`` (decoupled weight decay).
        lr, betas, eps: the optimiser's.
        weight_decay: applied to weights of two or more dimensions only (matrices, embeddings,
            ``W^A``); biases and layer-norm gains never decay (nanoGPT's rule). ``W^A`` decays
            because it takes ``W^V``'s place in the value path: exempting it would regularise
            super attention less than the variants it is compared with.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
        schedule: ``"constant"`` or ``"cosine"`` (from ``lr`` after warm-up down to ``min_lr`` at
            ``decay_steps``, default the run's last step).
        grad_clip: clip the global gradient norm to this (``None``: never).
        select: ``"best"`` keeps the round with the task's best validation metric (ties keep the
            later round); ``"last"`` keeps the final round.
        device: ``"auto"`` or a torch device name.
        num_threads: CPU threads for this run (``None`` leaves torch's setting). Results are
            bit-identical for the same seed and thread count.
        progress: a progress bar over rounds.
        eval_batch_size: examples per evaluation batch.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr: float = 0.0
    decay_steps: int | None = None
    grad_clip: float | None = None
    select: str = "best"
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    eval_batch_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_positive_int(name, getattr(self, name))
        for name, choices in (("optimizer", ("adam", "adamw")), ("schedule", ("constant", "cosine")), ("select", ("best", "last"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.decay_steps is not None:
            check_positive_int("decay_steps", self.decay_steps)
            if self.decay_steps <= self.warmup_steps:
                raise ValueError(f"decay_steps must exceed warmup_steps={self.warmup_steps}, got {self.decay_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of step ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    end = config.decay_steps or total_steps
    if step >= end:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, end - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(params: Sequence[Tensor], config: TrainConfig, *, replica_axis: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params``; with weight decay, two groups (only weights of 2+ dims decay).

    ``replica_axis``: each tensor is a stack of replicas along its first axis, which does not count
    as a dimension of the weight. The fused kernel is used where this torch and device have it; it
    computes the same update as the loop over tensors.
    """
    tensors = list(params)
    extra = 1 if replica_axis else 0
    if config.weight_decay > 0:
        groups: list[dict] = [
            {"params": [p for p in tensors if p.dim() - extra >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in tensors if p.dim() - extra < 2], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": tensors}]
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    options = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if config.optimizer == "adamw" and config.weight_decay == 0:
        options["weight_decay"] = 0.0  # AdamW's own default is 0.01
    try:
        return kind(groups, **options, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return kind(groups, **options)


# ------------------------------------------------------------------------------------- tasks
class Task:
    """What the loop needs to know about a problem; subclasses fill in the data and the scoring.

    A task holds its splits as tensors. :meth:`round_batches` draws the index tensors of one
    round from a generator; :meth:`batch` turns an index tensor of shape ``S`` (``(B,)``, or
    ``(R, B)`` for replicas) into ``(inputs, target)`` with leading shape ``S``.
    """

    #: the validation metric that selects a round, ``"acc"`` (higher is better) or ``"loss"``
    select_on: str = "acc"
    #: steps per round; ``None``: a round is one pass over a permutation of the training set
    steps_per_round: int | None = None

    def __init__(self, splits: dict[str, tuple[Tensor, ...]]) -> None:
        self.splits = splits

    def to(self, device: torch.device) -> Task:
        """The same task with its tensors on ``device``."""
        moved = copy.copy(self)
        moved.splits = {name: tuple(t.to(device) for t in tensors) for name, tensors in self.splits.items()}
        return moved

    def has(self, split: str) -> bool:
        return split in self.splits and self.splits[split] is not None

    def train_size(self) -> int:
        return len(self.splits["train"][-1])

    def round_batches(self, generator: torch.Generator, batch_size: int) -> list[Tensor]:
        """A round's index tensors: consecutive slices of a fresh permutation of the training set."""
        order = torch.randperm(self.train_size(), generator=generator)
        return list(order.split(batch_size))

    def batch(self, split: str, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, target)`` of the examples ``index`` of ``split``, with ``index``'s leading shape."""
        inputs, target = self.splits[split]
        index = index.to(target.device)
        return inputs[index], target[index]

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        inputs, target = self.splits[split]
        for start in range(0, len(target), batch_size):
            yield inputs[start : start + batch_size], target[start : start + batch_size]

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def correct(self, output: Tensor, target: Tensor) -> Tensor | None:
        """Per-example 0/1 (or bool) of the shape of ``target``, or ``None`` for no accuracy."""
        return None

    def terms(self, target: Tensor) -> int:
        """How many terms the mean loss of one (unstacked) batch averages over."""
        return target.numel()


class BinaryClassification(Task):
    """One logit per example, binary cross-entropy; right when ``logit > threshold`` matches ``label > 0.5``.

    Args:
        train, val, test: ``(inputs, labels)``; labels float 0/1. ``test`` may be ``None``.
        threshold: ``0.0`` is probability one half; the IMDB reference's ``0.5`` (probability
            0.62) was a bug, kept as an ablation.
    """

    def __init__(
        self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None = None, *, threshold: float = 0.0
    ) -> None:
        super().__init__({"train": tuple(train), "val": tuple(val), **({"test": tuple(test)} if test is not None else {})})
        self.threshold = float(threshold)

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.binary_cross_entropy_with_logits(output, target, reduction=reduction)

    def correct(self, output: Tensor, target: Tensor) -> Tensor:
        return (output > self.threshold) == (target > 0.5)


class Classification(Task):
    """``n_classes`` logits per example, cross-entropy; right when the arg-max is the label."""

    def __init__(self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__({"train": tuple(train), "val": tuple(val), **({"test": tuple(test)} if test is not None else {})})

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction=reduction)

    def correct(self, output: Tensor, target: Tensor) -> Tensor:
        return output.argmax(-1) == target


class LanguageModeling(Task):
    """Next-token prediction on streams of token ids; selects on validation loss (nats per token).

    A round is ``steps_per_round`` steps of ``batch_size`` windows of ``block_size`` tokens at
    random offsets (nanoGPT's sampling). Validation uses ``val_blocks`` fixed, evenly spaced
    windows of the validation stream (the same every round, so curves are comparable); ``"test"``
    is the whole validation stream cut into non-overlapping windows, evaluated once at the end.

    Args:
        train, val: 1-D integer tensors of token ids.
        block_size: the context length ``T``.
        steps_per_round: training steps between two validation passes.
        val_blocks: windows in the per-round validation pass (``None``: every window).
    """

    select_on = "loss"

    def __init__(self, train: Tensor, val: Tensor, *, block_size: int, steps_per_round: int, val_blocks: int | None = 256) -> None:
        check_positive_int("block_size", block_size)
        check_positive_int("steps_per_round", steps_per_round)
        if val_blocks is not None:
            check_positive_int("val_blocks", val_blocks)
        for name, stream in (("train", train), ("val", val)):
            if not isinstance(stream, Tensor) or stream.dim() != 1 or stream.is_floating_point():
                raise ValueError(f"{name} must be a 1-D integer tensor of token ids, got {getattr(stream, 'dtype', type(stream))}")
            if len(stream) <= block_size:
                raise ValueError(f"{name} must hold more than block_size={block_size} tokens, got {len(stream)}")
        self.block_size, self.steps_per_round = block_size, steps_per_round
        whole = torch.arange(0, len(val) - block_size, block_size)  # non-overlapping windows
        if val_blocks is not None and val_blocks < len(whole):
            picked = whole[torch.linspace(0, len(whole) - 1, val_blocks).round().long()]
        else:
            picked = whole
        super().__init__({"train": (train,), "val": (val, picked), "test": (val, whole)})

    def train_size(self) -> int:
        return len(self.splits["train"][0]) - self.block_size

    def round_batches(self, generator: torch.Generator, batch_size: int) -> list[Tensor]:
        return [torch.randint(self.train_size(), (batch_size,), generator=generator) for _ in range(self.steps_per_round)]

    def _windows(self, stream: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        span = torch.arange(self.block_size + 1, device=stream.device)
        window = stream[offsets.to(stream.device)[..., None] + span]  # (*S, T + 1)
        return window[..., :-1], window[..., 1:]

    def batch(self, split: str, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._windows(self.splits[split][0], index)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        stream, offsets = self.splits[split]
        for start in range(0, len(offsets), batch_size):
            yield self._windows(stream, offsets[start : start + batch_size])

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction=reduction)


# ----------------------------------------------------------------------------------- engines
class Engine:
    """Computes the steps of :func:`fit` for ``replicas`` models; every result has a leading ``R`` axis.

    Subclasses provide :meth:`step` and :meth:`predict` (and may replace :meth:`train_round` by a
    faster equivalent, as ``pba.fused.FusedEngine`` does); :meth:`keep` and :meth:`restore` hold
    each replica's best state.
    """

    replicas: int = 1

    def step(self, inputs: Tensor, target: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One optimiser step at rate ``lr``; returns losses ``(R,)`` and outputs ``(R, ...)``."""
        raise NotImplementedError

    def predict(self, inputs: Tensor) -> Tensor:
        """Eval-mode outputs ``(R, ...)`` for inputs shared by every replica, without gradients."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        """Switch dropout and the like on (training) or off."""

    def keep(self, replica: int) -> None:
        """Remember replica ``replica``'s current state as its best."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put every replica's kept state back into its model."""
        raise NotImplementedError

    def train_round(self, task: Task, batches: Sequence[Tensor], lrs: Sequence[float]) -> RoundStats:
        """The steps of one round, one per index tensor of ``batches`` at the rates ``lrs``."""
        loss_sum = correct = None
        terms = examples = 0
        for index, lr in zip(batches, lrs):
            inputs, target = task.batch("train", index)
            losses, output = self.step(inputs, target, lr)  # (R,), (R, ...)
            target = target.reshape(self.replicas, *target.shape[index.dim() - 1 :])  # (R, B, ...)
            with torch.no_grad():
                term = losses.double() * task.terms(target[0])
                loss_sum = term if loss_sum is None else loss_sum + term
                right = task.correct(output, target)
                if right is not None:
                    right = right.reshape(self.replicas, -1)
                    examples += right.shape[1]
                    correct = right.sum(1) if correct is None else correct + right.sum(1)
            terms += task.terms(target[0])
        if loss_sum is None:
            raise ValueError("batches must hold at least one batch, got none")
        return RoundStats(loss_sum, correct, terms, examples)


@dataclass
class RoundStats:
    """One round's training figures: per replica the loss summed over its terms ``(R,)`` (float64)
    and the count of correct predictions ``(R,)`` (``None`` without accuracy); ``terms`` and
    ``examples`` (predictions scored) of one replica."""

    loss_sum: Tensor
    correct: Tensor | None
    terms: int
    examples: int


class AutogradEngine(Engine):
    """One model: its own forward, PyTorch's backward, :func:`make_optimizer`'s optimiser."""

    def __init__(self, model: nn.Module, config: TrainConfig, task: Task) -> None:
        self.model, self.config, self.task = model, config, task
        self.optimizer = make_optimizer(list(model.parameters()), config)
        self.best: dict | None = None

    def step(self, inputs: Tensor, target: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        output = self.model(inputs)
        loss = self.task.loss(output, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss[None], output[None]

    @torch.no_grad()
    def predict(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[None]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def keep(self, replica: int) -> None:
        self.best = copy.deepcopy(self.model.state_dict())

    def restore(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best)


#: vmap's note that CPU's fused attention kernel has no batching rule (it loops over replicas);
#: measured on the IMDB model, the loop costs no more than the explicit path, so it is not news.
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


class ReplicaEngine(Engine):
    """Independent replicas of one architecture trained together, as one batched model.

    :func:`torch.func.stack_module_state` stacks the replicas' parameters along a new first axis
    and :func:`torch.func.vmap` runs the one model over that axis, so each step is one set of
    kernels for every replica. The loss is the sum of the replicas' losses, whose gradient with
    respect to replica ``r``'s slice is replica ``r``'s own gradient; Adam is elementwise, so Adam
    on the stacked tensors *is* the replicas' own Adams side by side (weight decay skips the same
    1-D tensors, and gradient clipping scales each replica by its own norm). This pays where kernel launches dominate (a GPU with a small
    model); on a CPU only the per-kernel overhead is saved.

    Dropout masks are drawn by vmap from one stream (seeded by :func:`fit` with the first seed):
    the same stack gives the same numbers, but a replica's numbers depend on the whole stack and
    differ from a lone run's with the same seed. Without dropout they equal a lone run's up to
    floating-point rounding (tested).
    """

    def __init__(self, models: Sequence[nn.Module], config: TrainConfig, task: Task) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.models, self.config, self.task = list(models), config, task
        self.replicas = len(self.models)
        self.params, self.buffers = stack_module_state(self.models)  # name -> (R, ...) leaves
        # The architecture; its weights are never read (functional_call passes the stacked ones). It
        # stays on the models' device: moving it to "meta" would untie tied weights (a GPT's head).
        self.skeleton = copy.deepcopy(self.models[0])

        def replica_output(p: dict, b: dict, inputs: Tensor) -> Tensor:
            return functional_call(self.skeleton, (p, b), (inputs,))

        def replica_loss(p: dict, b: dict, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
            output = replica_output(p, b, inputs)
            return task.loss(output, target), output

        self._step = vmap(replica_loss, randomness="different")  # each replica its own batch and dropout
        self._predict = vmap(replica_output, in_dims=(0, 0, None))  # every replica on the same inputs
        self.optimizer = make_optimizer(list(self.params.values()), config, replica_axis=True)
        self.best = {name: p.detach().clone() for name, p in self.params.items()}

    def step(self, inputs: Tensor, target: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            losses, output = self._step(self.params, self.buffers, inputs, target)  # (R,), (R, ...)
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
        if self.config.grad_clip is not None:
            self._clip(self.config.grad_clip)
        self.optimizer.step()
        return losses, output

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        """Each replica's global gradient norm clipped to ``max_norm``, as ``clip_grad_norm_`` would."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (R,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (R,)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))

    @torch.no_grad()
    def predict(self, inputs: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            return self._predict(self.params, self.buffers, inputs)

    def train(self, mode: bool = True) -> None:
        self.skeleton.train(mode)

    @torch.no_grad()
    def keep(self, replica: int) -> None:
        for name, p in self.params.items():
            self.best[name][replica].copy_(p[replica])

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.best[name])
        for r, model in enumerate(self.models):  # each model holds its kept state, as after a lone fit
            for name, weight in model.named_parameters():
                weight.copy_(self.best[name][r])


def _check_replicas(models: Sequence[nn.Module], seeds: Sequence[int]) -> None:
    if len(models) == 0:
        raise ValueError("models must hold at least one replica, got none")
    if len(seeds) != len(models):
        raise ValueError(f"seeds must give one seed per model: {len(models)} models, got {len(seeds)} seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    first = [(name, p.shape) for name, p in models[0].named_parameters()]
    for index, model in enumerate(models[1:], start=1):
        if type(model) is not type(models[0]) or [(n, p.shape) for n, p in model.named_parameters()] != first:
            raise ValueError(f"models must share one architecture; models[{index}] differs from models[0]")


# -------------------------------------------------------------------------------------- loop
@dataclass
class RunResult:
    """What one training run produced.

    ``val_acc``/``val_loss`` are those of the kept round; ``test_*`` are NaN without a test split
    (``test_acc`` also for tasks without accuracy). ``train_seconds`` and ``seconds`` are wall
    times; replicas trained together each get an equal share of the stack's wall time.
    """

    history: list[dict[str, float]]
    best_epoch: int
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    train_seconds: float
    seconds: float
    parameters: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(engine: Engine | nn.Module, task: Task, split: str, *, batch_size: int = 2048) -> tuple[list[float], list[float]]:
    """Per replica: the mean loss and the accuracy (NaN without one) on ``split``, in eval mode.

    ``engine`` may be a plain model (one replica, its own forward).
    """
    if isinstance(engine, nn.Module):
        engine = _ModelPredictor(engine)
    engine.train(False)
    loss_sum = correct = None
    terms = scored = 0
    for inputs, target in task.eval_batches(split, batch_size):
        output = engine.predict(inputs)  # (R, ...)
        stacked = target.expand(output.shape[0], *target.shape)
        term = torch.stack([task.loss(o, target, reduction="sum").double() for o in output])
        loss_sum = term if loss_sum is None else loss_sum + term
        right = task.correct(output, stacked)
        if right is not None:
            right = right.reshape(output.shape[0], -1)
            scored += right.shape[1]
            correct = right.sum(1) if correct is None else correct + right.sum(1)
        terms += task.terms(target)
    if loss_sum is None:
        raise ValueError(f"split {split!r} holds no examples")
    losses = (loss_sum / terms).tolist()
    accs = [math.nan] * len(losses) if correct is None else [c / scored for c in correct.tolist()]
    return losses, accs


class _ModelPredictor(Engine):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def predict(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[None]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


def fit(
    model: nn.Module | Sequence[nn.Module],
    task: Task,
    config: TrainConfig | None = None,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    engine: Engine | None = None,
) -> RunResult | list[RunResult]:
    """Train on ``task``, keep the round ``config.select`` picks, evaluate it on test.

    One model with ``seed``: returns a :class:`RunResult`. A list of models (replicas of one
    architecture) with ``seeds``: trained together by a :class:`ReplicaEngine`, each with its own
    batch order (the one a lone run with its seed draws), kept round and Adam state; returns one
    result per replica. ``seed`` (or ``seeds[r]``) drives the batch order and, through torch's
    global generator, dropout; the initialisation is the caller's (seed before building, as
    :func:`pba.experiments.imdb.run_one` does). Afterwards each model holds its kept weights.

    ``engine``: how steps are computed (default :class:`AutogradEngine`, or :class:`ReplicaEngine`
    for a list); it must have been built over ``model``.
    """
    config = config or TrainConfig()
    stacked = isinstance(model, (list, tuple))
    models = list(model) if stacked else [model]
    if stacked:
        if seeds is None or seed is not None:
            raise ValueError("a list of models takes seeds=[one per model], not seed")
        seeds = [int(s) for s in seeds]
        _check_replicas(models, seeds)
    else:
        if seeds is not None:
            raise ValueError("one model takes seed=..., not seeds; pass a list of models to train replicas")
        seeds = [0 if seed is None else int(seed)]
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    start = time.perf_counter()
    for m in models:
        m.to(device)
    task = task.to(device)
    if engine is None:
        engine = ReplicaEngine(models, config, task) if stacked else AutogradEngine(models[0], config, task)
    if engine.replicas != len(models):
        raise ValueError(f"engine must run {len(models)} replica(s), got one for {engine.replicas}")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    torch.manual_seed(seeds[0])  # dropout

    from tqdm.auto import tqdm

    replicas = len(models)
    per_round = task.steps_per_round or math.ceil(task.train_size() / config.batch_size)
    total_steps = per_round * config.epochs
    histories: list[list[dict[str, float]]] = [[] for _ in models]
    higher = task.select_on == "acc"
    best_score = [-math.inf if higher else math.inf] * replicas
    best_epoch, best_val, best_val_loss = [-1] * replicas, [math.nan] * replicas, [math.nan] * replicas
    steps = 0
    rounds = tqdm(range(config.epochs), desc="epochs", disable=not config.progress, leave=False)
    for epoch in rounds:
        engine.train(True)
        per_replica = [task.round_batches(g, config.batch_size) for g in generators]
        if stacked:
            batches = [torch.stack(group).to(device) for group in zip(*per_replica)]  # (R, B) each
        else:
            batches = [b.to(device) for b in per_replica[0]]  # (B,) each
        lrs = [learning_rate(config, steps + i, total_steps) for i in range(len(batches))]
        stats = engine.train_round(task, batches, lrs)
        steps += len(batches)
        val_loss, val_acc = evaluate(engine, task, "val", batch_size=config.eval_batch_size)
        train_loss = (stats.loss_sum / stats.terms).tolist()
        for r in range(replicas):
            record = {"epoch": epoch + 1, "train_loss": train_loss[r]}
            if stats.correct is not None:
                record["train_acc"] = stats.correct[r].item() / stats.examples
            record["val_loss"] = val_loss[r]
            if not math.isnan(val_acc[r]):
                record["val_acc"] = val_acc[r]
            histories[r].append(record)
            score = val_acc[r] if higher else val_loss[r]
            better = score >= best_score[r] if higher else score <= best_score[r]
            if config.select == "last" or better:
                best_score[r], best_epoch[r] = score, epoch + 1
                best_val[r], best_val_loss[r] = val_acc[r], val_loss[r]
                engine.keep(r)
        rounds.set_postfix({f"val_{task.select_on}": f"{(max if higher else min)(best_score):.4f}"})
    train_seconds = time.perf_counter() - start
    engine.restore()
    test_loss, test_acc = [math.nan] * replicas, [math.nan] * replicas
    if task.has("test"):
        test_loss, test_acc = evaluate(engine, task, "test", batch_size=config.eval_batch_size)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in models[0].parameters())
    results = [
        RunResult(
            history=histories[r],
            best_epoch=best_epoch[r],
            val_acc=best_val[r],
            val_loss=best_val_loss[r],
            test_acc=test_acc[r],
            test_loss=test_loss[r],
            train_seconds=train_seconds / replicas,
            seconds=seconds / replicas,
            parameters=parameters,
            device=str(device),
        )
        for r in range(replicas)
    ]
    return results if stacked else results[0]
