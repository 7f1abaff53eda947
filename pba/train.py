"""Training and evaluation of the IMDB classifier: seeding, devices, the protocol's loop.

The loop is the protocol, nothing cheaper: Adam over every parameter, batches of 64 drawn from a
fresh permutation each epoch, binary cross-entropy on logits, the epoch with the best validation
accuracy kept and evaluated once on test. It is fast because the reviews are already token-id
tensors (no per-batch collation) and the heads are vectorised.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrainConfig", "RunResult", "pick_device", "seed_everything", "evaluate", "fit"]


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


@dataclass
class TrainConfig:
    """The training protocol (defaults: the paper's IMDB setting).

    Attributes:
        threshold: a review counts as positive when its logit exceeds this. ``0.0`` is probability
            one half; the reference's ``0.5`` (probability 0.62) was a bug, kept as an ablation.
        num_threads: CPU threads for this run (``None`` leaves torch's setting). Results are
            bit-identical for the same seed and thread count.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    threshold: float = 0.0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    eval_batch_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


@dataclass
class RunResult:
    """What one training run produced."""

    history: list[dict[str, float]]
    best_epoch: int
    val_acc: float
    test_acc: float
    test_loss: float
    train_seconds: float
    seconds: float
    parameters: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Plain Adam; the fused kernel (same update) where this torch and device have it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def evaluate(
    model: nn.Module, ids: Tensor, labels: Tensor, *, threshold: float = 0.0, batch_size: int = 2048
) -> tuple[float, float]:
    """Mean binary cross-entropy and accuracy (``logit > threshold``) in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ids.device)
    correct = torch.zeros((), dtype=torch.int64, device=ids.device)
    for start in range(0, len(labels), batch_size):
        logits = model(ids[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss_sum += F.binary_cross_entropy_with_logits(logits, target, reduction="sum").double()
        correct += ((logits > threshold) == (target > 0.5)).sum()
    model.train(was_training)
    n = len(labels)
    return loss_sum.item() / n, correct.item() / n


def fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None = None,
    config: TrainConfig | None = None,
    *,
    seed: int = 0,
) -> RunResult:
    """Train ``model`` on ``train``, keep the best-validation epoch, evaluate it on ``test``.

    ``seed`` drives the batch order and dropout (the model's initialisation is the caller's: seed
    before building it, as :func:`pba.experiments.imdb.run_one` does). Ties in validation accuracy keep
    the later epoch, as the reference did.
    """
    config = config or TrainConfig()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    start = time.perf_counter()
    model.to(device)
    train_ids, train_y = (t.to(device) for t in train)
    val_ids, val_y = (t.to(device) for t in val)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    optimizer = _adam(list(model.parameters()), config.lr)

    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    best_val, best_epoch, best_state = -1.0, -1, None
    n = len(train_y)
    epochs = tqdm(range(config.epochs), desc="epochs", disable=not config.progress, leave=False)
    for epoch in epochs:
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for begin in range(0, n, config.batch_size):
            batch = order[begin : begin + config.batch_size]
            ids, target = train_ids[batch], train_y[batch]
            logits = model(ids)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += loss.double() * len(batch)
                correct += ((logits > config.threshold) == (target > 0.5)).sum()
        val_loss, val_acc = evaluate(
            model, val_ids, val_y, threshold=config.threshold, batch_size=config.eval_batch_size
        )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum.item() / n,
                "train_acc": correct.item() / n,
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
        )
        epochs.set_postfix(val_acc=f"{val_acc:.4f}")
        if val_acc >= best_val:
            best_val, best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    train_seconds = time.perf_counter() - start
    assert best_state is not None
    model.load_state_dict(best_state)
    test_loss, test_acc = float("nan"), float("nan")
    if test is not None:
        test_ids, test_y = (t.to(device) for t in test)
        test_loss, test_acc = evaluate(
            model, test_ids, test_y, threshold=config.threshold, batch_size=config.eval_batch_size
        )
    return RunResult(
        history=history,
        best_epoch=best_epoch,
        val_acc=best_val,
        test_acc=test_acc,
        test_loss=test_loss,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - start,
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(device),
    )
