"""Grids of small Vision Transformers on MNIST, one per (variant, seed).

The protocol (``MnistSettings`` defaults) is stated in full by its fields: 5,000 of the 60,000
training images held out for validation (a seeded random split), the rest trained on for
``epochs`` epochs with AdamW and a cosine schedule, no augmentation; the epoch with the best
validation accuracy is kept and evaluated once on the official 10,000 test images.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import costs
from ..costs import count_parameters
from ..data.mnist import MNISTSplits, load_mnist, split_mnist
from ..models.vit import ViT, ViTArchitecture, ViTConfig
from ..train import Classification, RunResult, TrainConfig
from . import grid

__all__ = ["MnistSettings", "EXPERIMENT", "run_one"]


@dataclass(frozen=True, kw_only=True)
class MnistSettings(ViTArchitecture):
    """Everything that determines a run apart from its variant and seed: the model's
    :class:`~pba.models.vit.ViTArchitecture` fields and the protocol below."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    val_size: int = 5_000
    split_seed: int = 0
    train_size: int = 0  # 0: every training image not held out for validation

    def model(self, variant: str) -> ViT:
        return ViT(ViTConfig(**self.architecture(), variant=variant))

    def splits(self, data_dir: str | None) -> MNISTSplits:
        return split_mnist(load_mnist(data_dir), val_size=self.val_size, split_seed=self.split_seed, train_size=self.train_size or None)

    def build_model(self, variant: str, splits: MNISTSplits) -> ViT:
        return self.model(variant)

    def task(self, splits: MNISTSplits) -> Classification:
        return Classification(splits.train, splits.val, splits.test)

    def record(self, model: ViT, result: RunResult, splits: MNISTSplits) -> dict:
        """Parameters, tokens and multiply-adds, attention maps on the first test digits, ``W^A``."""
        device = next(model.parameters()).device
        record = {
            "attention_parameters": sum(count_parameters(layer) for layer in model.attention_layers),
            "n_tokens": model.n_tokens,
            "macs_per_image": forward_macs(model.config),
            # attention maps (mean over heads) of every block on the first test digits, for the chapter
            "attention_maps": [
                [[[round(v, 4) for v in row] for row in image] for image in weights.mean(1).tolist()]
                for weights in model.eval().attention_weights(splits.test[0][:MAP_IMAGES].to(device))
            ],
        }
        if model.config.variant == "super":  # the learned W^A of every block
            record["wa"] = [[[round(v, 5) for v in row] for row in layer.wa_weight.tolist()] for layer in model.attention_layers]
        return record

    def train_config(self, device: str, num_threads: int | None, progress: bool) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, optimizer="adamw", lr=self.lr, weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps, schedule="cosine", min_lr=self.min_lr, device=device,
            num_threads=num_threads, progress=progress, eval_batch_size=1000,
        )


def run_one(variant: str, seed: int, splits: MNISTSplits, settings: MnistSettings, **options: object) -> dict:
    """One seeded run (:func:`pba.experiments.grid.run_one`); ``options``: device, num_threads, progress."""
    return grid.run_one(EXPERIMENT, variant, seed, splits, settings, **options)  # type: ignore[arg-type]


#: How many test digits the results file keeps attention maps of.
MAP_IMAGES = 4


def forward_macs(config: ViTConfig) -> int:
    """Multiply-adds of one image's forward pass: patch embedding, attention, MLPs, head."""
    n, d = config.n_tokens, config.d_model
    embedding = config.n_patches * config.patch_dim * d
    attention = costs.macs(config.variant, d, n)
    mlp = 2 * n * d * config.mlp_ratio * d
    return embedding + config.n_layers * (attention + mlp) + d * config.n_classes


# ------------------------------------------------------------------------------- command line
def report(run: dict) -> str:
    return (f"{run['variant']:<10} seed {run['seed']}: test acc {run['test_acc']:.4f} "
            f"(best epoch {run['best_epoch']}, {run['train_seconds']:.1f} s)")


# ------------------------------------------------------------------------------------ the grid
def load(settings: MnistSettings, data_dir: str | None) -> MNISTSplits:
    return settings.splits(data_dir)


def describe(splits: MNISTSplits) -> dict:
    return {"settings": splits.settings, "sizes": splits.sizes()}


#: The MNIST experiment, as :func:`pba.experiments.grid.run_grid` and the command line see it.
EXPERIMENT = grid.Experiment(
    "mnist", MnistSettings, load, describe, report, metric="test_acc", default_seeds=3
)
