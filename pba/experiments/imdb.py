"""Grids of IMDB runs: every setting explicit, one JSON file, resumable, written atomically."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

from ..attention import VARIANTS
from ..costs import count_parameters
from ..files import write_json_atomic
from ..data import EncodedSplits, prepare_imdb
from ..models import IMDBClassifier
from ..train import RunResult, TrainConfig, fit, fit_replicas, pick_device, seed_everything

__all__ = ["QUIRKS", "ImdbSettings", "run_one", "run_stack", "run_grid", "environment", "write_json_atomic"]

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
    stack_seeds: bool = False  # train a variant's seeds together (pba.train.fit_replicas)
    engine: str = "autograd"  # or "fused": pba.fused.FusedIMDBStep (CPU; see pba.train.TrainConfig)

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


def environment(device: torch.device | str) -> dict[str, object]:
    """Versions, device and machine, for every results file."""
    device = torch.device(device)
    env: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "git_revision": _git_revision(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_one(
    variant: str,
    seed: int,
    splits: EncodedSplits,
    settings: ImdbSettings,
    *,
    device: str = "auto",
    num_threads: int | None = 1,
    progress: bool = False,
) -> dict:
    """One seeded run: build the model from ``seed``, train, evaluate; a JSON-ready dict."""
    config = _prepare(variant, settings, device, num_threads, progress)
    model = _seeded_model(variant, seed, splits, settings)
    result = fit(model, splits.train, splits.val, splits.test, config, seed=seed)
    return _run_record(variant, seed, result, model)


def run_stack(
    variant: str,
    seeds: Iterable[int],
    splits: EncodedSplits,
    settings: ImdbSettings,
    *,
    device: str = "auto",
    num_threads: int | None = 1,
    progress: bool = False,
) -> list[dict]:
    """Several seeds of one variant trained together (:func:`pba.train.fit_replicas`).

    Each replica is built from its own seed exactly as in :func:`run_one`; the records say which
    seeds shared the stack (``"stack"``), since dropout masks are drawn for the stack as a whole.
    """
    config = _prepare(variant, settings, device, num_threads, progress)
    seeds = list(seeds)
    models = [_seeded_model(variant, seed, splits, settings) for seed in seeds]
    results = fit_replicas(models, splits.train, splits.val, splits.test, config, seeds=seeds)
    return [
        {**_run_record(variant, seed, result, model), "stack": seeds}
        for seed, result, model in zip(seeds, results, models)
    ]


def _prepare(
    variant: str, settings: ImdbSettings, device: str, num_threads: int | None, progress: bool
) -> TrainConfig:
    """Check the variant, set the thread count, and turn ``settings`` into a training config."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        threshold=settings.threshold,
        device=device,
        num_threads=num_threads,
        progress=progress,
        engine=settings.engine,
    )


def _seeded_model(variant: str, seed: int, splits: EncodedSplits, settings: ImdbSettings) -> IMDBClassifier:
    """The model initialised from ``seed`` (Python, NumPy and torch seeded first)."""
    seed_everything(seed)
    return settings.model(variant, len(splits.vocab), splits.train[0].shape[1])


def _run_record(variant: str, seed: int, result: RunResult, model: IMDBClassifier) -> dict:
    attention = model.blocks[0].attention
    return {
        "variant": variant,
        "seed": seed,
        **result.to_dict(),
        "attention_parameters": count_parameters(attention) * len(model.blocks),
    }


# ------------------------------------------------------------------------- parallel workers
_WORKER: dict[str, object] = {}


def _worker_init(protocol: str, split_seed: int, overrides: dict, data_dir: str | None) -> None:
    _WORKER["splits"] = prepare_imdb(protocol, split_seed=split_seed, data_dir=data_dir, **overrides)
    # Everything loaded so far lives as long as the worker: keep the garbage collector from
    # rescanning it during training (it showed as 3-4 % of a fused run's profile).
    gc.freeze()


def _worker_run(args: tuple) -> list[dict]:
    return _run_job(*args, _WORKER["splits"])


def _run_job(
    variant: str, seeds: list[int], settings: ImdbSettings, device: str, num_threads: int | None, splits: EncodedSplits
) -> list[dict]:
    """One job of a grid: a stack of seeds, or a single seed."""
    if settings.stack_seeds:
        return run_stack(variant, seeds, splits, settings, device=device, num_threads=num_threads)
    (seed,) = seeds
    return [run_one(variant, seed, splits, settings, device=device, num_threads=num_threads)]


def run_grid(
    out: str | os.PathLike[str],
    *,
    variants: Iterable[str] = VARIANTS,
    seeds: Iterable[int] = range(5),
    settings: ImdbSettings = ImdbSettings(),
    data_dir: str | None = None,
    device: str = "auto",
    workers: int = 1,
    num_threads: int | None = 1,
    command: str | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Run every ``(variant, seed)`` not yet in ``out``, saving ``out`` atomically after each run.

    A killed grid restarts where it stopped: finished runs are read back, never redone. ``out``
    written under other settings is an error (start a new file instead of mixing results).
    ``workers > 1`` runs that many processes (each with ``num_threads`` CPU threads; on a GPU they
    share the device); a run's numbers do not depend on which worker ran it. With
    ``settings.stack_seeds`` a variant's seeds are one job, trained together and saved together.
    """
    out = Path(out)
    variants, seeds = list(variants), list(seeds)
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {variant!r}")
    resolved = pick_device(device)
    config = dataclasses.asdict(settings)
    payload: dict = {"command": command, "settings": config, "runs": []}
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{out} is not a results file (invalid JSON: {error})") from error
        # A setting added after the file was written ran at its default there.
        before = {**dataclasses.asdict(ImdbSettings()), **previous.get("settings", {})}
        if before != config:
            raise ValueError(
                f"{out} holds runs made with other settings; choose another --out. "
                f"Differences: { {k: (before.get(k), v) for k, v in config.items() if before.get(k) != v} }"
            )
        payload["runs"] = previous.get("runs", [])
    done = {(r["variant"], r["seed"]) for r in payload["runs"]}
    todo = [(v, s) for v in variants for s in seeds if (v, s) not in done]

    splits = prepare_imdb(
        settings.protocol, split_seed=settings.split_seed, data_dir=data_dir, **settings.tokenizer_overrides()
    )
    payload["data"] = {"settings": splits.settings, "sizes": splits.sizes(), "vocab_size": len(splits.vocab)}
    payload["environment"] = environment(resolved)
    payload["environment"]["workers"] = workers
    payload["environment"]["threads_per_run"] = num_threads

    def record(runs: list[dict]) -> None:  # a job's runs are saved together
        payload["runs"].extend(runs)
        payload["runs"].sort(key=lambda r: (variants.index(r["variant"]) if r["variant"] in variants else 99, r["seed"]))
        write_json_atomic(out, payload)
        if on_run is not None:
            for run in runs:
                on_run(run)

    if settings.stack_seeds:  # one job per variant: its seeds not yet done, trained together
        groups = [[s for v, s in todo if v == variant] for variant in variants]
        jobs = [(v, g, settings, str(resolved), num_threads) for v, g in zip(variants, groups) if g]
    else:
        jobs = [(v, [s], settings, str(resolved), num_threads) for v, s in todo]

    started = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        initargs = (settings.protocol, settings.split_seed, settings.tokenizer_overrides(), data_dir)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=initargs) as pool:
            for future in as_completed([pool.submit(_worker_run, job) for job in jobs]):
                record(future.result())  # saved as soon as a job finishes, whatever the order
    else:
        for job in jobs:
            record(_run_job(*job, splits))
    payload["environment"]["grid_seconds_this_session"] = time.perf_counter() - started
    write_json_atomic(out, payload)
    return payload
