"""Where one IMDB training step spends its time: the profile behind the CPU speed work.

    PBA_IMDB_DIR=../shared/data/imdb python benchmarks/imdb_profile.py --out results/profile-imdb-step.txt

One process, one thread (as each grid worker runs): ``--steps`` steps of ``pba``'s training loop
(the seed protocol's data, batch 64, fused Adam) for one variant, first timed, then under
``torch.profiler``, whose table of operators by self time is printed. Then the orientation
check: a batch of products with an 8-wide output (``B*h`` products of ``32 x 32`` by ``32 x 8``,
as attention's ``S V`` and two of its gradients are) against the same products transposed
(``8 x 32`` by ``32 x 32``), which compute the same numbers up to rounding.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pba
from pba.benchmark import require_at_least
from pba.data import prepare_imdb
from pba.experiments import ImdbSettings
from pba.experiments.grid import environment
from pba.files import write_text_atomic
from pba.train import TrainConfig, make_optimizer, seed_everything


def profile_steps(variant: str, settings: ImdbSettings, data_dir: str | None, steps: int) -> tuple[float, str]:
    """Milliseconds per training step, and the profiler's table for ``steps`` more steps."""
    splits = prepare_imdb(settings.protocol, data_dir=data_dir, **settings.tokenizer_overrides())
    seed_everything(0)
    model = settings.model(variant, len(splits.vocab), splits.train[0].shape[1])
    optimizer = make_optimizer(list(model.parameters()), TrainConfig(lr=settings.lr))
    ids, labels = splits.train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = len(labels) // settings.batch_size

    def step(index: int) -> None:
        start = (index % batches) * settings.batch_size
        batch = order[start : start + settings.batch_size]
        loss = F.binary_cross_entropy_with_logits(model(ids[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index in range(50):  # warm-up
        step(index)
    begin = time.perf_counter()
    for index in range(steps):
        step(index)
    ms_per_step = (time.perf_counter() - begin) / steps * 1e3
    with torch.profiler.profile() as profiler:
        for index in range(steps):
            step(index)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return ms_per_step, table


def orientation_us(batch: int, repeats: int = 300) -> dict[str, float]:
    """Median microseconds of ``(batch, 32, 32) @ (batch, 32, 8)``, computed as is and transposed."""
    weights, values = torch.randn(batch, 32, 32), torch.randn(batch, 32, 8)
    forms = {
        "as is: (32x32)(32x8)": lambda: torch.bmm(weights, values),
        "transposed: ((32x8)^T (32x32)^T)^T": lambda: torch.bmm(values.mT, weights.mT).mT,
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():  # interleaved
            start = time.perf_counter()
            form()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="standard", choices=pba.VARIANTS)
    parser.add_argument("--settings", default="reference", choices=("reference", "defaults"),
                        help="the reference's quirks (as in the speed bar) or pba's defaults")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", help="also write what is printed to this text file")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"steps": 1})
    torch.set_num_threads(1)
    settings = ImdbSettings.with_quirks() if args.settings == "reference" else ImdbSettings()
    ms_per_step, table = profile_steps(args.variant, settings, args.data_dir, args.steps)
    machine = environment("cpu")
    lines = [
        "command: python benchmarks/imdb_profile.py " + " ".join(shlex.quote(a) for a in argv),
        f"{machine['processor']}, {machine['date'][:10]}; torch {torch.__version__}, 1 thread, {args.variant}, "
        f"{args.settings} settings, batch {settings.batch_size}",
        f"{ms_per_step:.2f} ms per training step (timed without the profiler, {args.steps} steps)",
        table,
        "batched products with an 8-wide output, B*h = 256 (median us):",
        *(f"  {name:<36} {us:8.1f}" for name, us in orientation_us(256).items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
