"""Grids of runs for any experiment: one JSON file, resumable, written atomically, in parallel.

An experiment module describes itself with an :class:`Experiment`: its settings dataclass and
module-level functions (so worker processes can import them) that load the data once per process
and describe it for the results file. The settings build the rest of a run (see
:class:`Experiment`); :func:`run_one` and :func:`run_stack` train one seed or a stack of seeds
through :func:`pba.train.fit`, and :func:`run_grid` runs every (variant, seed), the same way for
every experiment.
"""

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

from .._checks import check_positive_int
from ..attention import VARIANTS
from ..files import write_json_atomic
from ..train import RunResult, fit, pick_device, seed_everything

__all__ = ["Experiment", "environment", "train_one", "run_one", "run_stack", "run_grid"]

Loader = Callable[[object, "str | None"], object]


@dataclass(frozen=True)
class Experiment:
    """What :func:`run_grid` and the command line need to know about one experiment.

    The settings dataclass builds each run: ``settings.build_model(variant, data)`` (called right
    after seeding), ``settings.task(data)`` (a :class:`pba.train.Task`),
    ``settings.train_config(device, num_threads, progress)`` and ``settings.record(model, result,
    data)`` (the experiment's own fields of a run's record); optionally
    ``settings.make_engine(model, config, seed, device)`` (an engine for :func:`pba.train.fit`, or
    ``None``) and ``settings.stack_seeds`` (train a variant's seeds together).

    Attributes:
        name: the command-line name, also recorded in every results file.
        settings: the frozen dataclass of everything that determines a run but its variant and seed.
        load: ``load(settings, data_dir) -> data``, once per process.
        describe: ``describe(data) -> dict``, what the results file records of the data.
        report: ``report(run) -> str``, one line per finished run.
        metric: the per-run number the summary compares (``"test_acc"`` or ``"test_loss"``).
        default_seeds: seeds 0 .. N-1 unless told otherwise.
    """

    name: str
    settings: type
    load: Loader
    describe: Callable[[object], dict]
    report: Callable[[dict], str]
    metric: str = "test_acc"
    default_seeds: int = 3


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def train_one(
    experiment: Experiment, variant: str, seed: int, data: object, settings: object, *,
    device: str = "auto", num_threads: int | None = 1, progress: bool = False,
) -> tuple[torch.nn.Module, RunResult]:
    """One seeded run: the model built right after seeding with ``seed``, trained by
    :func:`pba.train.fit` (through the settings' engine, if any); the trained model and its result."""
    _check_variant(variant)
    config = settings.train_config(device, num_threads, progress)  # type: ignore[attr-defined]
    seed_everything(seed)
    model = settings.build_model(variant, data)  # type: ignore[attr-defined]
    engine = settings.make_engine(model, config, seed, device) if hasattr(settings, "make_engine") else None
    result = fit(model, settings.task(data), config, seed=seed, engine=engine)  # type: ignore[attr-defined]
    return model, result


def run_one(
    experiment: Experiment, variant: str, seed: int, data: object, settings: object, *,
    device: str = "auto", num_threads: int | None = 1, progress: bool = False,
) -> dict:
    """:func:`train_one`, recorded: the run's JSON-ready dict, as a grid stores it."""
    model, result = train_one(experiment, variant, seed, data, settings, device=device, num_threads=num_threads, progress=progress)
    return {"variant": variant, "seed": seed, **result.to_dict(), **settings.record(model, result, data)}  # type: ignore[attr-defined]


def run_stack(
    experiment: Experiment, variant: str, seeds: Iterable[int], data: object, settings: object, *,
    device: str = "auto", num_threads: int | None = 1, progress: bool = False,
) -> list[dict]:
    """Several seeds of one variant trained together (:class:`pba.train.ReplicaEngine`).

    Each replica is built from its own seed exactly as in :func:`run_one`; the records say which
    seeds shared the stack (``"stack"``), since dropout masks are drawn for the stack as a whole.
    """
    _check_variant(variant)
    config = settings.train_config(device, num_threads, progress)  # type: ignore[attr-defined]
    seeds = list(seeds)
    models = []
    for seed in seeds:
        seed_everything(seed)
        models.append(settings.build_model(variant, data))  # type: ignore[attr-defined]
    results = fit(models, settings.task(data), config, seeds=seeds)  # type: ignore[attr-defined]
    return [
        {"variant": variant, "seed": seed, **result.to_dict(), **settings.record(model, result, data), "stack": seeds}  # type: ignore[attr-defined]
        for seed, result, model in zip(seeds, results, models)
    ]


def _run_job(
    experiment: Experiment, variant: str, seeds: list[int], settings: object, device: str, num_threads: int | None, data: object
) -> list[dict]:
    """One job of a grid: a stack of seeds trained together, or one seed."""
    if getattr(settings, "stack_seeds", False):
        return run_stack(experiment, variant, seeds, data, settings, device=device, num_threads=num_threads)
    return [run_one(experiment, variant, seed, data, settings, device=device, num_threads=num_threads) for seed in seeds]


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


# ------------------------------------------------------------------------- parallel workers
_WORKER: dict[str, object] = {}


def _worker_init(load: Loader, settings: object, data_dir: str | None) -> None:
    _WORKER["data"] = load(settings, data_dir)
    # Everything loaded so far lives as long as the worker: keep the garbage collector from
    # rescanning it during training (it showed as 3-4 % of a fused run's profile).
    gc.freeze()


def _worker_run(experiment: Experiment, job: tuple) -> list[dict]:
    return _run_job(experiment, *job, _WORKER["data"])


def run_grid(
    experiment: Experiment,
    out: str | os.PathLike[str],
    *,
    settings: object | None = None,
    variants: Iterable[str] = VARIANTS,
    seeds: Iterable[int] | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    workers: int = 1,
    num_threads: int | None = 1,
    command: str | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Run every ``(variant, seed)`` not yet in ``out``, saving ``out`` atomically after each job.

    A killed grid restarts where it stopped: finished runs are read back, never redone. ``out``
    written under other settings is an error (start a new file instead of mixing results).
    ``workers > 1`` runs that many processes (each with ``num_threads`` CPU threads; on a GPU they
    share the device); a run's numbers do not depend on which worker ran it. With ``stack_seeds`` a
    variant's seeds are one job, trained together and saved together. ``settings`` default to
    the experiment's defaults, ``seeds`` to ``range(experiment.default_seeds)``. The file records
    the experiment's name (files from before it was recorded are IMDB's).
    """
    out = Path(out)
    settings = experiment.settings() if settings is None else settings
    if not isinstance(settings, experiment.settings):
        raise TypeError(f"settings must be a {experiment.settings.__name__}, got {type(settings).__name__}")
    stack_seeds = bool(getattr(settings, "stack_seeds", False))
    variants = list(variants)
    seeds = list(range(experiment.default_seeds) if seeds is None else seeds)
    for variant in variants:
        _check_variant(variant)
    if not seeds:
        raise ValueError("seeds must name at least one seed, got none")
    check_positive_int("workers", workers)
    resolved = pick_device(device)
    config = dataclasses.asdict(settings)  # type: ignore[call-overload]
    payload: dict = {"experiment": experiment.name, "command": command, "settings": config, "runs": []}
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{out} is not a results file (invalid JSON: {error})") from error
        if previous.get("experiment", "imdb") != experiment.name:
            raise ValueError(
                f"{out} holds runs of experiment {previous.get('experiment', 'imdb')!r}, not {experiment.name!r}; choose another --out"
            )
        # A setting added after the file was written ran at its default there.
        before = {**dataclasses.asdict(type(settings)()), **previous.get("settings", {})}  # type: ignore[call-overload]
        if before != config:
            raise ValueError(
                f"{out} holds runs made with other settings; choose another --out. "
                f"Differences: { {k: (before.get(k), v) for k, v in config.items() if before.get(k) != v} }"
            )
        payload["runs"] = previous.get("runs", [])
    elif not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
        raise PermissionError(f"cannot write results to {out}: its folder is not writable")
    done = {(r["variant"], r["seed"]) for r in payload["runs"]}
    todo = [(v, s) for v in variants for s in seeds if (v, s) not in done]

    data = experiment.load(settings, data_dir)
    payload["data"] = experiment.describe(data)
    payload["environment"] = environment(resolved)
    payload["environment"]["workers"] = workers
    payload["environment"]["threads_per_run"] = num_threads

    def record(runs: list[dict]) -> None:  # a job's runs are saved together
        payload["runs"].extend(runs)
        payload["runs"].sort(key=lambda r: (variants.index(r["variant"]) if r["variant"] in variants else 99, r["seed"]))
        write_json_atomic(out, payload)
        if on_run is not None:
            for one in runs:
                on_run(one)

    if stack_seeds:  # one job per variant: its seeds not yet done, trained together
        groups = [[s for v, s in todo if v == variant] for variant in variants]
        jobs = [(v, g, settings, str(resolved), num_threads) for v, g in zip(variants, groups) if g]
    else:
        jobs = [(v, [s], settings, str(resolved), num_threads) for v, s in todo]

    started = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        context = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(experiment.load, settings, data_dir)) as pool:
            for future in as_completed([pool.submit(_worker_run, experiment, job) for job in jobs]):
                record(future.result())  # saved as soon as a job finishes, whatever the order
    else:
        for job in jobs:
            record(_run_job(experiment, *job, data))
    payload["environment"]["grid_seconds_this_session"] = time.perf_counter() - started
    write_json_atomic(out, payload)
    return payload
