"""``python -m pba.experiments EXPERIMENT ...``: run a grid, then print and save its summary.

Every experiment takes the same grid flags (variants, seeds, output, data, device, workers,
threads) plus one flag per field of its settings dataclass. A user's mistake (a missing or corrupt
data directory, a bad option value, an unwritable output) ends with one line ``error: ...`` on
stderr and exit status 2, as argparse does for its own errors; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from ..attention import VARIANTS
from ..files import write_json_atomic
from .grid import run_grid
from .summary import format_table, plot_results, summarise

_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _bool(text: str) -> bool:
    if text.lower() not in _BOOL:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return _BOOL[text.lower()]


@dataclass(frozen=True)
class Command:
    """One subcommand: the module holding the experiment (its ``EXPERIMENT``) and its help texts."""

    module: str
    help: str
    data_help: str

    def load(self):  # noqa: ANN201 (a module)
        return importlib.import_module(self.module, __package__)


COMMANDS: dict[str, Command] = {
    "imdb": Command(
        ".imdb", "IMDB sentiment classification (the paper's text experiment)",
        "local Parquet copy of stanfordnlp/imdb (default: $PBA_IMDB_DIR, else the Hub)",
    ),
    "shakespeare": Command(
        ".shakespeare", "character-level GPT on Tiny Shakespeare (nanoGPT's CPU recipe)",
        "directory holding Tiny Shakespeare's input.txt (default: $PBA_SHAKESPEARE_DIR, else download)",
    ),
    "mnist": Command(
        ".mnist", "a small Vision Transformer on MNIST (the fixed-context setting)",
        "directory of MNIST's four IDX files, gzipped or not (default: $PBA_MNIST_DIR, else the Hub)",
    ),
}


def _settings_flags(parser: argparse.ArgumentParser, settings_type: type, skip: set[str]) -> None:
    for f in fields(settings_type):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pba.experiments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    for name, command in COMMANDS.items():
        module = command.load()
        experiment = module.EXPERIMENT
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
        p.add_argument("--seeds", type=int, default=experiment.default_seeds, help=f"run seeds 0 .. N-1 (default {experiment.default_seeds})")
        p.add_argument("--out", required=True, help="results JSON (resumed if it exists)")
        p.add_argument("--figures", help="directory for PNG/SVG figures (default: beside --out)")
        p.add_argument("--data-dir", help=command.data_help)
        p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, ...")
        p.add_argument("--workers", type=int, default=1, help="parallel processes (one per CPU core, or several sharing a GPU)")
        p.add_argument("--threads", type=int, default=1, help="CPU threads per run (results depend on it)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
        _settings_flags(p, experiment.settings, set(getattr(module, "CLI_SKIP", ())))
    return parser


def _settings(module, args: argparse.Namespace):  # noqa: ANN001, ANN202
    settings_type = module.EXPERIMENT.settings
    skip = set(getattr(module, "CLI_SKIP", ()))
    overrides = {f.name: getattr(args, f.name) for f in fields(settings_type) if f.name not in skip and getattr(args, f.name) is not None}
    if hasattr(module, "settings_from_args"):
        return module.settings_from_args(args, overrides)
    return settings_type(**overrides)


def run(argv: list[str]) -> int:
    """Parse ``argv``, run the grid, write the summary; errors propagate (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.experiment].load()
    experiment = module.EXPERIMENT
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    settings = _settings(module, args)
    command = "python -m pba.experiments " + " ".join(shlex.quote(a) for a in argv)

    def report(one: dict) -> None:
        print(experiment.report(one), flush=True)

    payload = run_grid(
        experiment,
        args.out,
        variants=args.variants,
        seeds=range(args.seeds),
        settings=settings,
        data_dir=args.data_dir,
        device=args.device,
        workers=args.workers,
        num_threads=args.threads,
        command=command,
        on_run=report,
    )
    rows = summarise(payload, metric=experiment.metric)
    payload["summary"] = rows
    write_json_atomic(Path(args.out), payload)
    print(format_table(rows, metric=experiment.metric))
    out = Path(args.out)
    for path in plot_results(payload, args.figures or out.parent, out.stem, metric=experiment.metric):
        print(f"wrote {path}")
    return 0


#: The errors a user's input can cause: a bad value, a missing or unreadable file or directory,
#: data that cannot be had offline (the loaders' RuntimeError).
USER_ERRORS = (ValueError, OSError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Run :func:`run`; a user's mistake prints ``error: ...`` on stderr and returns 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except USER_ERRORS as error:
        if "--debug" in argv:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"python -m pba.experiments: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m pba.experiments: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "build_parser", "main", "run"]
