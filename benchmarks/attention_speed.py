"""Time each attention variant against pba's standard layer and torch.nn.MultiheadAttention.

    python benchmarks/attention_speed.py                        # the full grid, CPU float32
    python benchmarks/attention_speed.py --device cuda --dtypes float32 bfloat16
    python benchmarks/attention_speed.py --quick                # a small grid, for the book

One process, every shape: warm-up, then ``--repeats`` rounds in which every variant runs once,
interleaved, and the medians are compared. Printed per shape: each variant's forward+backward time
relative to pba's standard layer, next to the ratio of multiply-adds that ``pba.costs`` predicts,
and the peak memory of one forward+backward. Results go to JSON (with device, versions, threads,
date, git revision and command) and a PNG plot.

Times are taken with the default memory allocator, as any training process runs. On CPU the peak
memory comes from a second process run under ``MALLOC_MMAP_THRESHOLD_=65536``, where freed tensors
leave the resident set so that the high-water mark tracks live tensors; in that setting every
large allocation faults its pages in afresh, which would add 10-20 % to the times (more to the
variants that allocate more), so no time is taken there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import statistics
import sys
from pathlib import Path

import torch

import pba
from pba.benchmark import CONTENDERS, bench_shape, shape_memory
from pba.experiments.grid import environment as run_environment

ROOT = Path(__file__).resolve().parent.parent
FULL_GRID = [(length, d) for length in (32, 128, 512, 2048) for d in (64, 256, 512)]
QUICK_GRID = [(32, 64), (128, 256), (128, 512)]


def print_row(row: dict) -> None:
    head = f"l={row['length']:>4} d={row['d_model']:>3} B={row['batch']:>4} {row['dtype']:<8}"
    parts = []
    for name in CONTENDERS:
        memory = row["peak_memory_mib"][name]
        mem = "" if memory is None else f" {memory:6.1f}MiB"
        parts.append(f"{name}: {row['ratio_to_standard'][name]:.2f} (MACs {row['mac_ratio'][name]:.2f}){mem}")
    print(head, " | ".join(parts), flush=True)


def summarise(rows: list[dict]) -> dict:
    float32 = [r for r in rows if r["dtype"] == "float32"]
    summary: dict[str, object] = {
        "median_standard_over_torch_mha": statistics.median(
            1 / r["ratio_to_standard"]["torch_mha"] for r in float32
        ) if float32 else None,
    }
    target = [r for r in float32 if r["length"] == 128 and r["d_model"] == 512]
    if target:
        r = target[0]
        summary["l128_d512"] = {
            v: {
                "measured": r["ratio_to_standard"][v],
                "predicted": r["mac_ratio"][v],
                "within_15_percent": r["ratio_to_standard"][v] <= 1.15 * r["mac_ratio"][v],
            }
            for v in ("optimised", "efficient", "super")
        }
    square = [r for r in float32 if r["length"] == r["d_model"]]
    summary["super_vs_optimised_at_l_eq_d"] = [
        {"length": r["length"], "super_over_optimised": r["ratio_to_standard"]["super"] / r["ratio_to_standard"]["optimised"]}
        for r in square
    ]
    return summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    markers = {"optimised": "o", "efficient": "s", "super": "^", "torch_mha": "x"}
    for name, marker in markers.items():
        xs = [r["mac_ratio"][name] for r in rows]
        ys = [r["ratio_to_standard"][name] for r in rows]
        ax.scatter(xs, ys, marker=marker, label=name)
    ax.plot([0.4, 1.3], [0.4, 1.3], color="gray", lw=0.8, label="time = MACs")
    ax.set(xlabel="predicted ratio (multiply-adds, pba.costs)", ylabel="measured time ratio (fwd+bwd)",
           title="Each variant relative to pba's standard layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: str) -> dict:
    """The project's run environment (versions, machine, date, git revision), plus threads."""
    env = {**run_environment(device), "pba": pba.__version__, "threads": torch.get_num_threads()}
    if not device.startswith("cuda"):
        env["cpu"] = env.pop("processor")
    return env


def cpu_memory_in_child(argv: list[str]) -> dict[tuple[str, int, int], dict]:
    """Peak memory per ``(dtype, length, d_model)``, measured by this script in a fresh process
    with ``--memory-only`` under ``MALLOC_MMAP_THRESHOLD_=65536`` (see the module docstring)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-only"],
        env=env, capture_output=True, text=True, check=True,
    )
    rows = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    return {(r["dtype"], r["length"], r["d_model"]): r["peak_memory_mib"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small grid (for the book's live run)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--out", default=None, help="JSON path (default: results/bench-attention-<device>.json)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the CPU memory child
    args = parser.parse_args(argv)

    grid = [(l, d) for l, d in (QUICK_GRID if args.quick else FULL_GRID) if l <= args.max_length]
    shapes = [(dtype_name, length, d_model) for dtype_name in args.dtypes for length, d_model in grid]
    on_cpu = not args.device.startswith("cuda")
    if args.memory_only:
        for dtype_name, length, d_model in shapes:
            peak = shape_memory(length, d_model, args.heads, args.device, getattr(torch, dtype_name))
            print(json.dumps({"dtype": dtype_name, "length": length, "d_model": d_model, "peak_memory_mib": peak}), flush=True)
        return 0
    rows = []
    for dtype_name, length, d_model in shapes:
        row = bench_shape(
            length, d_model, args.heads, args.device, getattr(torch, dtype_name), args.repeats, args.warmup,
            memory=not on_cpu,  # CUDA's allocator statistics are exact in this process
        )
        print_row(row)  # on CPU without memory: that comes next, from the child process
        rows.append(row)
    if on_cpu:
        print("peak memory of one forward+backward, measured in a child process:", flush=True)
        memory = cpu_memory_in_child(argv)
        for row in rows:
            row["peak_memory_mib"] = memory[(row["dtype"], row["length"], row["d_model"])]
            print_row(row)
    payload = {
        "command": "python benchmarks/attention_speed.py " + " ".join(shlex.quote(a) for a in argv),
        "environment": environment(args.device),
        "rows": rows,
        "summary": summarise(rows),
    }
    print(json.dumps(payload["summary"], indent=1))
    if args.out != "-":
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
        out = Path(args.out or ROOT / "results" / f"bench-attention-{kind}{'-quick' if args.quick else ''}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, out)
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
