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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrainConfig", "RunResult", "pick_device", "seed_everything", "evaluate", "fit", "fit_replicas"]


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


#: How a training step computes its gradients (see :class:`TrainConfig`).
ENGINES = ("autograd", "fused")


@dataclass
class TrainConfig:
    """The training protocol (defaults: the paper's IMDB setting).

    Attributes:
        threshold: a review counts as positive when its logit exceeds this. ``0.0`` is probability
            one half; the reference's ``0.5`` (probability 0.62) was a bug, kept as an ablation.
        num_threads: CPU threads for this run (``None`` leaves torch's setting). Results are
            bit-identical for the same seed and thread count.
        engine: ``"autograd"`` (default): the model's forward and PyTorch's backward.
            ``"fused"``: :class:`pba.fused.FusedIMDBStep`, the same loss and gradients in one
            hand-written C++ call (CPU, :class:`~pba.models.IMDBClassifier` only; its dropout
            masks come from its own generator, so its numbers differ from autograd's as another
            seed's would). The optimiser is the same plain Adam either way.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    threshold: float = 0.0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    eval_batch_size: int = 2048
    engine: str = "autograd"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


@dataclass
class RunResult:
    """What one training run produced.

    ``train_seconds`` and ``seconds`` are wall times; for replicas trained together by
    :func:`fit_replicas` each replica gets an equal share of the stack's wall time.
    """

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
    model: nn.Module,
    ids: Tensor,
    labels: Tensor,
    *,
    threshold: float = 0.0,
    batch_size: int = 2048,
    logits_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """Mean binary cross-entropy and accuracy (``logit > threshold``) in eval mode.

    ``logits_fn`` computes the logits of a batch instead of ``model`` (the fused engine's forward).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ids.device)
    correct = torch.zeros((), dtype=torch.int64, device=ids.device)
    for start in range(0, len(labels), batch_size):
        batch = ids[start : start + batch_size]
        logits = model(batch) if logits_fn is None else logits_fn(batch)
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
    fused = None
    if config.engine == "fused":
        from .fused import FusedAdam, FusedIMDBStep

        fused = FusedIMDBStep(model, seed=seed)  # type: ignore[arg-type]
        optimizer: torch.optim.Optimizer | FusedAdam = FusedAdam(fused, lr=config.lr)
    else:
        optimizer = _adam(list(model.parameters()), config.lr)
    logits_fn = None if fused is None else fused.logits

    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    best_val, best_epoch, best_state = -1.0, -1, None
    n = len(train_y)
    epochs = tqdm(range(config.epochs), desc="epochs", disable=not config.progress, leave=False)
    for epoch in epochs:
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        if fused is not None:  # the loop below, run by the C++ engine: pba.fused.FusedIMDBStep.train_epoch
            train_loss, train_correct = fused.train_epoch(
                train_ids, train_y, order, config.batch_size, optimizer, threshold=config.threshold
            )
        else:
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
            train_loss, train_correct = loss_sum.item(), correct.item()
        val_loss, val_acc = evaluate(
            model, val_ids, val_y, threshold=config.threshold, batch_size=config.eval_batch_size, logits_fn=logits_fn
        )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss / n,
                "train_acc": train_correct / n,
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
            model, test_ids, test_y, threshold=config.threshold, batch_size=config.eval_batch_size, logits_fn=logits_fn
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


# ------------------------------------------------------------------------- replicas in one stack
#: vmap's note that CPU's fused attention kernel has no batching rule (it loops over replicas);
#: measured on the IMDB model, the loop costs no more than the explicit path, so it is not news.
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


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


@torch.no_grad()
def _evaluate_replicas(
    predict, params: dict, buffers: dict, ids: Tensor, labels: Tensor, threshold: float, batch_size: int
) -> tuple[list[float], list[float]]:
    """Per replica: mean binary cross-entropy and accuracy on the same examples."""
    replicas = next(iter(params.values())).shape[0]
    loss_sum = torch.zeros(replicas, dtype=torch.float64, device=ids.device)
    correct = torch.zeros(replicas, dtype=torch.int64, device=ids.device)
    for start in range(0, len(labels), batch_size):
        logits = predict(params, buffers, ids[start : start + batch_size])  # (R, n)
        target = labels[start : start + batch_size].expand_as(logits)
        loss_sum += F.binary_cross_entropy_with_logits(logits, target, reduction="none").double().sum(1)
        correct += ((logits > threshold) == (target > 0.5)).sum(1)
    n = len(labels)
    return (loss_sum / n).tolist(), (correct.double() / n).tolist()


def fit_replicas(
    models: Sequence[nn.Module],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None = None,
    config: TrainConfig | None = None,
    *,
    seeds: Sequence[int],
) -> list[RunResult]:
    """Train independent replicas of one architecture together, as one batched model.

    ``models[r]`` (built by the caller after seeding with ``seeds[r]``) follows :func:`fit`'s
    protocol with ``seed=seeds[r]``: its own initialisation, its own batch order (the same
    permutations as :func:`fit` draws), Adam over every parameter, its own best-validation epoch
    evaluated on test; afterwards it holds that epoch's weights, as after :func:`fit`.

    How: :func:`torch.func.stack_module_state` stacks the replicas' parameters along a new first
    axis and :func:`torch.func.vmap` runs the one model over that axis, so each step is one set of
    kernels for every replica. The loss is the sum of the replicas' losses, whose gradient with
    respect to replica ``r``'s slice is replica ``r``'s own gradient; Adam is elementwise, so Adam
    on the stacked tensors *is* the replicas' own Adams side by side. This pays where kernel
    launches dominate (a GPU with a small model). On a CPU the arithmetic per kernel grows with
    the stack, so only the per-kernel overhead is saved, plus what several threads gain on
    larger kernels (``benchmarks/imdb_speed.py --stack``).

    Dropout masks are drawn by vmap from one stream seeded with ``seeds[0]``: the same stack gives
    the same numbers, but a replica's numbers depend on the whole stack and differ from
    :func:`fit`'s with the same seed. Without dropout they equal :func:`fit`'s up to
    floating-point rounding (tested).
    """
    from torch.func import functional_call, stack_module_state, vmap
    from tqdm.auto import tqdm

    models, seeds = list(models), [int(s) for s in seeds]
    _check_replicas(models, seeds)
    config = config or TrainConfig()
    if config.engine != "autograd":
        raise ValueError(f"fit_replicas stacks replicas with torch.func and needs engine='autograd', got {config.engine!r}")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    start = time.perf_counter()
    for model in models:
        model.to(device)
    params, buffers = stack_module_state(models)  # name -> (R, ...) leaves
    skeleton = copy.deepcopy(models[0]).to("meta")  # the architecture; weights come from params

    def replica_logits(p: dict, b: dict, ids: Tensor) -> Tensor:
        return functional_call(skeleton, (p, b), (ids,))

    def replica_loss(p: dict, b: dict, ids: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = replica_logits(p, b, ids)
        return F.binary_cross_entropy_with_logits(logits, target), logits

    train_step = vmap(replica_loss, randomness="different")  # each replica its own batch and dropout
    predict = vmap(replica_logits, in_dims=(0, 0, None))  # every replica on the same examples

    train_ids, train_y = (t.to(device) for t in train)
    val_ids, val_y = (t.to(device) for t in val)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    torch.manual_seed(seeds[0])  # the stack's dropout stream
    optimizer = _adam(list(params.values()), config.lr)

    replicas, n = len(models), len(train_y)
    histories: list[list[dict[str, float]]] = [[] for _ in models]
    best_val, best_epoch = [-1.0] * replicas, [-1] * replicas
    best = {name: p.detach().clone() for name, p in params.items()}
    epochs = tqdm(range(config.epochs), desc="epochs", disable=not config.progress, leave=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        for epoch in epochs:
            skeleton.train()
            orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)  # (R, n)
            loss_sum = torch.zeros(replicas, dtype=torch.float64, device=device)
            correct = torch.zeros(replicas, dtype=torch.int64, device=device)
            for begin in range(0, n, config.batch_size):
                batch = orders[:, begin : begin + config.batch_size]  # (R, B)
                ids, target = train_ids[batch], train_y[batch]  # (R, B, L), (R, B)
                losses, logits = train_step(params, buffers, ids, target)  # (R,), (R, B)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                optimizer.step()
                with torch.no_grad():
                    loss_sum += losses.double() * batch.shape[1]
                    correct += ((logits > config.threshold) == (target > 0.5)).sum(1)
            skeleton.eval()
            val_loss, val_acc = _evaluate_replicas(
                predict, params, buffers, val_ids, val_y, config.threshold, config.eval_batch_size
            )
            train_loss, train_acc = (loss_sum / n).tolist(), (correct.double() / n).tolist()
            for r in range(replicas):
                histories[r].append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": train_loss[r],
                        "train_acc": train_acc[r],
                        "val_loss": val_loss[r],
                        "val_acc": val_acc[r],
                    }
                )
                if val_acc[r] >= best_val[r]:  # ties keep the later epoch, as in fit
                    best_val[r], best_epoch[r] = val_acc[r], epoch + 1
                    with torch.no_grad():
                        for name, p in params.items():
                            best[name][r].copy_(p[r])
            epochs.set_postfix(val_acc=f"{max(val_acc):.4f}")
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = [float("nan")] * replicas, [float("nan")] * replicas
        if test is not None:
            test_ids, test_y = (t.to(device) for t in test)
            test_loss, test_acc = _evaluate_replicas(
                predict, best, buffers, test_ids, test_y, config.threshold, config.eval_batch_size
            )
    with torch.no_grad():
        for r, model in enumerate(models):
            for name, weight in model.named_parameters():  # each model keeps its best epoch
                weight.copy_(best[name][r])
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in models[0].parameters())
    return [
        RunResult(
            history=histories[r],
            best_epoch=best_epoch[r],
            val_acc=best_val[r],
            test_acc=test_acc[r],
            test_loss=test_loss[r],
            train_seconds=train_seconds / replicas,
            seconds=seconds / replicas,
            parameters=parameters,
            device=str(device),
        )
        for r in range(replicas)
    ]
