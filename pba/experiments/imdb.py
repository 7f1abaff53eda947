"""Grids of IMDB runs: every setting explicit, one JSON file, resumable, written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass


from ..costs import count_parameters
from ..data import EncodedSplits, prepare_imdb
from ..models import IMDBClassifier
from ..train import BinaryClassification, Engine, RunResult, TrainConfig, pick_device
from . import grid
from .grid import environment

__all__ = ["QUIRKS", "ENGINES", "ImdbSettings", "train_one", "run_one", "run_stack", "run_grid", "environment"]

#: The reference reimplementation's choices, each of which the book ablates one at a time.
QUIRKS: dict[str, object] = {
    "softmax_over": "queries",  # softmax(dim=1) over (B, L_q, L_k)
    "wa_bias": True,  # nn.Linear(l, l) for W^A
    "padding_mask": False,  # padded tokens are attended to
    "masked_pooling": False,  # and averaged over
    "unknown_as_padding": True,  # vocab.get(word, <PAD>)
    "vocab_from": "all",  # vocabulary counted on all 50,000 reviews
    "threshold": 0.5,  # accuracy as logit > 0.5
}


#: How a training step computes its gradients: PyTorch's autograd, or pba.fused's C++ step. The
#: fused step draws its dropout masks from its own generator, so its numbers differ from
#: autograd's as another seed's would.
ENGINES = ("autograd", "fused")


@dataclass(frozen=True)
class ImdbSettings:
    """Everything that determines a run apart from its variant and seed."""

    protocol: str = "seed"
    split_seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    n_blocks: int = 1
    softmax_over: str = "keys"
    wa_bias: bool = False
    wa_sharing: str = "layer"
    padding_mask: bool = True
    masked_pooling: bool = True
    unknown_as_padding: bool = False
    vocab_from: str = "train"
    truncation: str | None = None  # None: the protocol's own
    threshold: float = 0.0
    stack_seeds: bool = False  # train a variant's seeds together (pba.train.ReplicaEngine)
    engine: str = "autograd"  # or "fused": pba.fused.FusedEngine, the step in C++ (CPU only)

    @classmethod
    def with_quirks(cls, **overrides: object) -> ImdbSettings:
        """The reference reimplementation's settings, then ``overrides``."""
        return cls(**{**QUIRKS, **overrides})  # type: ignore[arg-type]

    def tokenizer_overrides(self) -> dict[str, object]:
        overrides: dict[str, object] = {
            "unknown_as_padding": self.unknown_as_padding,
            "vocab_from": self.vocab_from,
        }
        if self.truncation is not None:
            overrides["truncation"] = self.truncation
        return overrides

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.stack_seeds and self.engine != "autograd":
            raise ValueError(f"stack_seeds needs engine='autograd' (replicas are stacked with torch.func), got {self.engine!r}")

    def task(self, splits: EncodedSplits) -> BinaryClassification:
        """The classification task on ``splits`` with this protocol's accuracy threshold."""
        return BinaryClassification(splits.train, splits.val, splits.test, threshold=self.threshold)

    def train_config(self, device: str, num_threads: int | None, progress: bool) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, device=device, num_threads=num_threads,
            progress=progress,
        )

    def build_model(self, variant: str, splits: EncodedSplits) -> IMDBClassifier:
        return self.model(variant, len(splits.vocab), splits.train[0].shape[1])

    def make_engine(self, model: IMDBClassifier, config: TrainConfig, seed: int, device: str) -> Engine | None:
        """``pba.fused.FusedEngine`` with ``engine="fused"`` (CPU only); ``None``: autograd."""
        if self.engine != "fused":
            return None
        from ..fused import FusedEngine

        if pick_device(device).type != "cpu":
            raise ValueError(f"engine='fused' runs on the CPU only, got device {device!r} (pass --device cpu)")
        return FusedEngine(model, config, seed=seed)

    def record(self, model: IMDBClassifier, result: RunResult, splits: EncodedSplits) -> dict:
        return {"attention_parameters": count_parameters(model.blocks[0].attention) * len(model.blocks)}

    def model(self, variant: str, vocab_size: int, context_length: int) -> IMDBClassifier:
        options: dict[str, object] = {"softmax_over": self.softmax_over}
        if variant == "super":
            options.update(wa_bias=self.wa_bias, wa_sharing=self.wa_sharing)
        return IMDBClassifier(
            variant,
            vocab_size=vocab_size,
            context_length=context_length,
            n_blocks=self.n_blocks,
            padding_mask=self.padding_mask,
            masked_pooling=self.masked_pooling,
            **options,
        )


def train_one(
    variant: str, seed: int, splits: EncodedSplits, settings: ImdbSettings, **options: object
) -> tuple[IMDBClassifier, RunResult]:
    """The trained model of one seeded run and its result (:func:`pba.experiments.grid.train_one`)."""
    return grid.train_one(EXPERIMENT, variant, seed, splits, settings, **options)  # type: ignore[arg-type,return-value]


def run_one(variant: str, seed: int, splits: EncodedSplits, settings: ImdbSettings, **options: object) -> dict:
    """One seeded run (:func:`pba.experiments.grid.run_one`); ``options``: device, num_threads, progress."""
    return grid.run_one(EXPERIMENT, variant, seed, splits, settings, **options)  # type: ignore[arg-type]


def run_stack(variant: str, seeds: Iterable[int], splits: EncodedSplits, settings: ImdbSettings, **options: object) -> list[dict]:
    """Seeds of one variant trained together (:func:`pba.experiments.grid.run_stack`)."""
    return grid.run_stack(EXPERIMENT, variant, seeds, splits, settings, **options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- command line
#: settings the command line sets through its own flags (--protocol, --epochs) rather than generated ones
CLI_SKIP = ("protocol", "epochs")


def add_arguments(parser) -> None:  # noqa: ANN001 (an argparse parser)
    """The IMDB flags that are not plain settings fields."""
    parser.add_argument("--protocol", choices=("seed", "paper"), default="seed")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--quirks",
        choices=("none", "reference"),
        default="none",
        help="'reference': start from the reference reimplementation's choices (every flag below can still override)",
    )


def settings_from_args(args, overrides: dict) -> ImdbSettings:  # noqa: ANN001
    overrides = {**overrides, "protocol": args.protocol, "epochs": args.epochs}
    return ImdbSettings.with_quirks(**overrides) if args.quirks == "reference" else ImdbSettings(**overrides)


def report(run: dict) -> str:
    return (f"{run['variant']:<10} seed {run['seed']}: test acc {run['test_acc']:.4f} "
            f"(best epoch {run['best_epoch']}, {run['train_seconds']:.1f} s)")


# ------------------------------------------------------------------------------------ the grid
def load(settings: ImdbSettings, data_dir: str | None) -> EncodedSplits:
    """The encoded splits that ``settings`` train on (cached on disk by :func:`prepare_imdb`)."""
    return prepare_imdb(
        settings.protocol, split_seed=settings.split_seed, data_dir=data_dir, **settings.tokenizer_overrides()
    )


def describe(splits: EncodedSplits) -> dict:
    return {"settings": splits.settings, "sizes": splits.sizes(), "vocab_size": len(splits.vocab)}


#: The IMDB experiment, as :func:`pba.experiments.grid.run_grid` and the command line see it.
EXPERIMENT = grid.Experiment(
    "imdb", ImdbSettings, load, describe, report, metric="test_acc", default_seeds=5
)


def run_grid(out: str | os.PathLike[str], **options: object) -> dict:
    """The IMDB grid: :func:`pba.experiments.grid.run_grid` of :data:`EXPERIMENT` (same options)."""
    return grid.run_grid(EXPERIMENT, out, **options)  # type: ignore[arg-type]
