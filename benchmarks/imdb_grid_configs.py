"""Wall time of one IMDB grid in three configurations of workers, threads and seed stacking.

    PBA_IMDB_DIR=../shared/data/imdb python benchmarks/imdb_grid_configs.py --out results/bench-imdb-grid-configs.txt

Runs, one after the other, the same grid (``--protocol seed --quirks reference``, every variant,
``--seeds`` seeds of ``--epochs`` epochs) as three commands of ``python -m pba.experiments imdb``:

1. two single-threaded workers (``--workers 2 --threads 1``);
2. the same with each variant's seeds trained together (``--stack-seeds true``);
3. one worker with two threads, seeds stacked (``--workers 1 --threads 2 --stack-seeds true``).

Each command's wall time is measured from outside (process start, data from the cache, training,
validation and test); the data cache is filled before the first one. The grids' own results go to
a temporary directory. The report (the command that wrote it first) is printed and, with
``--out``, written to a text file.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pba
from pba.data import prepare_imdb
from pba.experiments import ImdbSettings
from pba.experiments.grid import environment
from pba.files import write_text_atomic

CONFIGS = (
    ("--workers", "2", "--threads", "1"),
    ("--workers", "2", "--threads", "1", "--stack-seeds", "true"),
    ("--workers", "1", "--threads", "2", "--stack-seeds", "true"),
)


def grid_command(protocol: str, variants: list[str], seeds: int, epochs: int, config: tuple[str, ...], out: str) -> list[str]:
    """The argument list of one grid (after ``python -m pba.experiments``)."""
    return [
        "imdb", "--protocol", protocol, "--quirks", "reference", "--variants", *variants,
        "--seeds", str(seeds), "--epochs", str(epochs), *config, "--out", out,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("seed", "paper"), default="seed")
    parser.add_argument("--variants", nargs="+", default=list(pba.VARIANTS), choices=pba.VARIANTS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="local Parquet copy of IMDB (default: $PBA_IMDB_DIR)")
    parser.add_argument("--configs", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3],
                        help="which configurations to run (default: all three)")
    parser.add_argument("--out", help="also write the report to this text file")
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    settings = ImdbSettings.with_quirks(protocol=args.protocol)
    prepare_imdb(args.protocol, data_dir=args.data_dir, **settings.tokenizer_overrides())  # fill the cache
    machine = environment("cpu")
    lines = [
        "command: python benchmarks/imdb_grid_configs.py " + " ".join(shlex.quote(a) for a in argv),
        f"# {args.protocol} protocol, reference quirks: {len(args.variants)} variant(s) x {args.seeds} seed(s) x "
        f"{args.epochs} epoch(s) per grid, configurations {', '.join(map(str, args.configs))} run one after the other",
        f"# on {machine['cpu_count']} cores ({machine['processor']}), {machine['date']}, torch {machine['torch']}, "
        f"git {machine['git_revision']}.",
        "# Wall time of each command (process start, data from cache, training, validation and test):",
    ]
    print("\n".join(lines), flush=True)
    extra = [] if args.data_dir is None else ["--data-dir", args.data_dir]
    with tempfile.TemporaryDirectory() as tmp:
        for index in args.configs:
            config = CONFIGS[index - 1]
            shown = grid_command(args.protocol, args.variants, args.seeds, args.epochs, config, f"g{index}.json")
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "pba.experiments", *shown, *extra],
                cwd=tmp, check=True, stdout=subprocess.DEVNULL,
            )
            seconds = time.perf_counter() - start
            lines.append(f"python -m pba.experiments {' '.join(shlex.quote(a) for a in shown)}: {seconds:.1f} s")
            print(lines[-1], flush=True)
    if args.out:
        write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
