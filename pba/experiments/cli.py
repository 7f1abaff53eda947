"""``python -m pba.experiments imdb ...``: run a grid, then print and save its summary."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from ..attention import VARIANTS
from .imdb import ImdbSettings, run_grid, write_json_atomic
from .summary import format_table, plot_results, summarise

_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _bool(text: str) -> bool:
    if text.lower() not in _BOOL:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return _BOOL[text.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pba.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="experiment", required=True)
    imdb = sub.add_parser("imdb", help="IMDB sentiment classification (the paper's text experiment)")
    imdb.add_argument("--protocol", choices=("seed", "paper"), default="seed")
    imdb.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    imdb.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (default 5)")
    imdb.add_argument("--epochs", type=int, default=10)
    imdb.add_argument("--out", required=True, help="results JSON (resumed if it exists)")
    imdb.add_argument("--figures", help="directory for PNG/SVG figures (default: beside --out)")
    imdb.add_argument("--data-dir", help="local Parquet copy of stanfordnlp/imdb (default: $PBA_IMDB_DIR, else the Hub)")
    imdb.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, ...")
    imdb.add_argument("--workers", type=int, default=1, help="parallel processes (one per CPU core, or several sharing a GPU)")
    imdb.add_argument("--threads", type=int, default=1, help="CPU threads per run (results depend on it)")
    imdb.add_argument(
        "--quirks",
        choices=("none", "reference"),
        default="none",
        help="'reference': start from the reference reimplementation's choices (every flag below can still override)",
    )
    for f in fields(ImdbSettings):
        if f.name in ("protocol", "epochs"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        imdb.add_argument(flag, type=kind, default=None, help=f"default: {f.default!r} (or the quirk preset's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(ImdbSettings)
        if f.name not in ("protocol", "epochs") and getattr(args, f.name) is not None
    }
    overrides.update(protocol=args.protocol, epochs=args.epochs)
    settings = ImdbSettings.with_quirks(**overrides) if args.quirks == "reference" else ImdbSettings(**overrides)
    command = "python -m pba.experiments " + " ".join(shlex.quote(a) for a in argv)

    def report(run: dict) -> None:
        print(f"{run['variant']:<10} seed {run['seed']}: test acc {run['test_acc']:.4f} "
              f"(best epoch {run['best_epoch']}, {run['train_seconds']:.1f} s)", flush=True)

    payload = run_grid(
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
    rows = summarise(payload)
    payload["summary"] = rows
    write_json_atomic(Path(args.out), payload)
    print(format_table(rows))
    out = Path(args.out)
    for path in plot_results(payload, args.figures or out.parent, out.stem):
        print(f"wrote {path}")
    return 0
