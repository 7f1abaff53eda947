"""Sampling speed of the character-level GPT with and without the key/value cache, per variant.

    python benchmarks/generate_speed.py --threads 1 --out results/bench-generate-speed.json

Each contender is :func:`pba.models.generate` on the grid's GPT (4 layers, 4 heads, width 128,
block 64, random weights: speed does not depend on them) from a one-character prompt to
``block_size`` characters, batch 1: ``use_cache=True`` (each step feeds the newest token,
:class:`pba.KVCache`) against ``use_cache=False`` (each step runs the whole context again). Rounds
alternate the two and rotate the variants; the speed-up of the cache gets the 95 % interval of
:func:`pba.benchmark.speedup_interval`. Both must sample the same text from the same seed, which
the script checks before timing.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import pba
from pba.benchmark import require_at_least, speedup_interval
from pba.experiments.grid import environment
from pba.experiments.shakespeare import ShakespeareSettings
from pba.files import write_json_atomic
from pba.models import generate

VOCAB = 65


def sample(model: pba.models.GPT, tokens: int, use_cache: bool) -> torch.Tensor:
    """``tokens`` characters after a one-character prompt, from a fixed seed."""
    prompt = torch.zeros(1, 1, dtype=torch.int64)
    return generate(model, prompt, tokens, generator=torch.Generator().manual_seed(0), use_cache=use_cache)


def timed(model: pba.models.GPT, tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    sample(model, tokens, use_cache)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, at least 2 (default 7)")
    parser.add_argument("--out", help="also write the results as JSON, e.g. results/bench-generate-speed.json")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"threads": 1, "rounds": 2})  # two rounds for an interval
    torch.set_num_threads(args.threads)
    command = "python benchmarks/generate_speed.py " + " ".join(shlex.quote(a) for a in argv)
    print("command: " + command)
    settings = ShakespeareSettings()
    tokens = settings.block_size - 1  # one-character prompt, up to a full context
    models = {}
    for variant in pba.VARIANTS:
        torch.manual_seed(0)
        models[variant] = settings.model(variant, VOCAB).eval()
        if not torch.equal(sample(models[variant], tokens, True), sample(models[variant], tokens, False)):
            raise SystemExit(f"{variant}: the cached and uncached samples differ")
        timed(models[variant], tokens, True), timed(models[variant], tokens, False)  # warm-up
    times = {(v, c): [] for v in pba.VARIANTS for c in (True, False)}
    for r in range(args.rounds):
        turn = r % len(pba.VARIANTS)
        order = pba.VARIANTS[turn:] + pba.VARIANTS[:turn]
        for variant in order:
            for cache in (True, False) if r % 2 else (False, True):
                times[variant, cache].append(timed(models[variant], tokens, cache))
    rows = []
    print(f"{tokens} new tokens after a 1-token prompt, batch 1, {args.threads} thread(s), {args.rounds} rounds")
    print(f"{'variant':<10} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9} {'95 % interval':>16}  verdict")
    for variant in pba.VARIANTS:
        cached, uncached = times[variant, True], times[variant, False]
        geometric, low, high, verdict = speedup_interval(uncached, cached)
        row = {
            "variant": variant,
            "tokens": tokens,
            "cached_tokens_per_second": tokens / statistics.median(cached),
            "uncached_tokens_per_second": tokens / statistics.median(uncached),
            "speedup": geometric,  # the geometric mean of the rounds' ratios
            "speedup_interval_95": [low, high],
            "verdict": verdict,
            "cached_seconds": cached,
            "uncached_seconds": uncached,
        }
        rows.append(row)
        print(f"{variant:<10} {row['cached_tokens_per_second']:>13.0f} {row['uncached_tokens_per_second']:>15.0f} "
              f"{geometric:>8.2f}x {f'{low:.2f} to {high:.2f}':>16}  {verdict}")
    if args.out:
        machine = environment("cpu")
        machine["threads"] = args.threads
        write_json_atomic(Path(args.out), {"command": command, "environment": machine, "rounds": args.rounds, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
