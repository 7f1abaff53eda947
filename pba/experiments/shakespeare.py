"""Grids of character-level GPTs on Tiny Shakespeare, one per (variant, seed): nanoGPT's CPU recipe.

The recipe (``ShakespeareSettings`` defaults) is nanoGPT's ``train_shakespeare_char`` configuration
as its README runs it on a CPU: block 64, batch 12, 4 layers, 4 heads, width 128, no dropout,
AdamW (lr 1e-3, 100 warm-up steps, cosine decay to 1e-4 over 2,000 iterations, beta2 0.99,
weight decay 0.1 on matrices, gradient clipping at 1.0). Every ``eval_interval`` steps the loss is
measured on the same ``val_blocks`` windows of the validation text; after the last step, on the
whole validation text in non-overlapping windows (``test_loss``, nats per character). The run
keeps its last step (no selection on validation, which is also what it reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int
from ..costs import count_parameters
from ..data.shakespeare import CharCorpus, load_shakespeare
from ..models.gpt import GPT, GPTArchitecture, GPTConfig, generate
from ..train import LanguageModeling, RunResult, TrainConfig
from . import grid

__all__ = ["ShakespeareSettings", "EXPERIMENT", "run_one"]


@dataclass(frozen=True, kw_only=True)
class ShakespeareSettings(GPTArchitecture):
    """Everything that determines a run apart from its variant and seed: the model's
    :class:`~pba.models.gpt.GPTArchitecture` fields (nanoGPT's CPU model by default) and the
    training protocol below."""

    iterations: int = 2000
    eval_interval: int = 250
    val_blocks: int = 256
    batch_size: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("iterations", "eval_interval", "val_blocks", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.iterations % self.eval_interval:
            raise ValueError(
                f"iterations must be a multiple of eval_interval={self.eval_interval}, got {self.iterations}"
            )

    def model(self, variant: str, vocab_size: int) -> GPT:
        return GPT(GPTConfig(**self.architecture(), vocab_size=vocab_size, variant=variant))

    def build_model(self, variant: str, corpus: CharCorpus) -> GPT:
        return self.model(variant, corpus.vocab_size)

    def record(self, model: GPT, result: RunResult, corpus: CharCorpus) -> dict:
        """Bits per character, parameters, speed, a sample of text, and super's ``W^A``."""
        tokens = self.iterations * self.batch_size * self.block_size
        record = {
            "val_bpc": result.test_loss / math.log(2),
            "attention_parameters": sum(count_parameters(block.attn) for block in model.blocks),
            "seconds_per_iteration": result.train_seconds / self.iterations,
            "tokens_per_second": tokens / result.train_seconds,
            "sample": sample_text(model, corpus),
        }
        if model.config.variant == "super":  # the learned W^A of every layer, for the chapter's pictures
            record["wa"] = [[[round(v, 5) for v in row] for row in block.attn.wa_weight.tolist()] for block in model.blocks]
        return record

    def task(self, corpus: CharCorpus) -> LanguageModeling:
        return LanguageModeling(
            corpus.train, corpus.val, block_size=self.block_size, steps_per_round=self.eval_interval,
            val_blocks=self.val_blocks,
        )

    def train_config(self, device: str, num_threads: int | None, progress: bool) -> TrainConfig:
        return TrainConfig(
            epochs=self.iterations // self.eval_interval, batch_size=self.batch_size, optimizer="adamw",
            lr=self.lr, betas=(0.9, self.beta2), weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
            schedule="cosine", min_lr=self.min_lr, decay_steps=self.iterations, grad_clip=self.grad_clip,
            select="last", device=device, num_threads=num_threads, progress=progress, eval_batch_size=256,
        )


def run_one(variant: str, seed: int, corpus: CharCorpus, settings: ShakespeareSettings, **options: object) -> dict:
    """One seeded run (:func:`pba.experiments.grid.run_one`); ``options``: device, num_threads, progress."""
    return grid.run_one(EXPERIMENT, variant, seed, corpus, settings, **options)  # type: ignore[arg-type]


#: What every trained model is asked to continue, and how: the same prompt and sampling seed for
#: every run, so samples differ only by the model.
SAMPLE_PROMPT, SAMPLE_CHARS, SAMPLE_TEMPERATURE, SAMPLE_SEED = "\n", 400, 0.8, 0


def sample_text(model: GPT, corpus: CharCorpus) -> str:
    """``SAMPLE_CHARS`` characters sampled after ``SAMPLE_PROMPT`` at ``SAMPLE_TEMPERATURE``."""
    device = next(model.parameters()).device
    prompt = torch.tensor([corpus.encode(SAMPLE_PROMPT)], device=device)
    generator = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
    # Without the key/value cache, as the committed grids drew their samples: the cache gives the same
    # logits only up to rounding, which could change a sampled character.
    out = generate(model, prompt, SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE, generator=generator, use_cache=False)
    return corpus.decode(out[0, len(SAMPLE_PROMPT):])


# ------------------------------------------------------------------------------- command line
def report(run: dict) -> str:
    return (f"{run['variant']:<10} seed {run['seed']}: validation loss {run['test_loss']:.4f} "
            f"({run['val_bpc']:.3f} bits/char, {1000 * run['seconds_per_iteration']:.0f} ms/iteration)")


# ------------------------------------------------------------------------------------ the grid
def load(settings: ShakespeareSettings, data_dir: str | None) -> CharCorpus:
    return load_shakespeare(data_dir)


def describe(corpus: CharCorpus) -> dict:
    return {"source": corpus.source, "vocab_size": corpus.vocab_size, "train_chars": len(corpus.train), "val_chars": len(corpus.val)}


#: The Tiny Shakespeare experiment, as :func:`pba.experiments.grid.run_grid` and the command line see it.
EXPERIMENT = grid.Experiment(
    "shakespeare", ShakespeareSettings, load, describe, report, metric="test_loss", default_seeds=3
)
