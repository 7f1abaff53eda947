"""Wall-clock time and peak memory of each attention variant against the standard layer.

The engine behind ``benchmarks/attention_speed.py`` and the book's cost chapter: for one shape it
builds every variant (and ``torch.nn.MultiheadAttention``), warms up, then times forward and
forward+backward in interleaved rounds and reports medians, ratios to pba's standard layer, the
multiply-add ratios that :mod:`pba.costs` predicts, and peak memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .attention import VARIANTS, make_attention
from .costs import macs

__all__ = ["CONTENDERS", "TOKENS_PER_BATCH", "bench_shape", "shape_memory", "speedup_interval", "require_at_least"]

CONTENDERS = ("torch_mha", *VARIANTS)
TOKENS_PER_BATCH = 8192  # batch = tokens / length, so every shape does comparable work


class TorchMHA(nn.Module):
    """``torch.nn.MultiheadAttention`` behind pba's call signature (self-attention)."""

    def __init__(self, d_model: int, n_heads: int, **factory: object) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def build(name: str, d_model: int, n_heads: int, length: int, device: str, dtype: torch.dtype) -> nn.Module:
    if name == "torch_mha":
        return TorchMHA(d_model, n_heads, device=device, dtype=dtype)
    return make_attention(name, d_model, n_heads, context_length=length, device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(module: nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        module(x).sum().backward()
    else:
        with torch.no_grad():
            module(x)


def timed(module: nn.Module, x: torch.Tensor, backward: bool, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run_once(module, x, backward)
    synchronize(device)
    return time.perf_counter() - start


def _read_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(module: nn.Module, x: torch.Tensor, device: str) -> float | None:
    """Peak memory of one forward+backward: CUDA allocator peak, or the rise of Linux VmHWM.

    On CPU the process's high-water mark is reset to its current size, one forward+backward runs,
    and the rise is reported; this includes the inputs' gradient and the parameters' gradients. It
    tracks live tensors only if freed ones leave the resident set: run it under
    ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every block of 64 KiB or more on its own and
    unmaps it when freed). That setting makes every such allocation fault its pages in afresh, so
    ``benchmarks/attention_speed.py`` times in a process with the default allocator and measures
    memory in a separate one.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(module, x, backward=True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to current RSS
    except OSError:
        return None
    base = _read_hwm_kib()
    run_once(module, x, backward=True)
    peak = _read_hwm_kib()
    return None if base is None or peak is None else (peak - base) / 1024


def _contenders(
    length: int, d_model: int, n_heads: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, nn.Module]]:
    """A seeded input ``(TOKENS_PER_BATCH // length, length, d_model)`` and every contender."""
    batch = max(1, TOKENS_PER_BATCH // length)
    torch.manual_seed(0)
    x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
    return x, {name: build(name, d_model, n_heads, length, device, dtype) for name in CONTENDERS}


def shape_memory(
    length: int, d_model: int, n_heads: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, float | None]:
    """Peak memory (MiB) of one forward+backward of every contender at one shape (see :func:`peak_memory_mib`)."""
    x, modules = _contenders(length, d_model, n_heads, device, dtype)
    for module in modules.values():  # steady state, as after timing: gradients already allocated
        run_once(module, x, backward=True)
    return {name: peak_memory_mib(module, x, device) for name, module in modules.items()}


def bench_shape(
    length: int,
    d_model: int,
    n_heads: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 7,
    warmup: int = 2,
    memory: bool = True,
) -> dict:
    """Benchmark every contender at one shape; batch = ``TOKENS_PER_BATCH // length``.

    ``memory=False`` leaves ``peak_memory_mib`` empty (``None`` per contender), for callers that
    measure memory elsewhere (``benchmarks/attention_speed.py`` does it in a child process on CPU).
    """
    x, modules = _contenders(length, d_model, n_heads, device, dtype)
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "forward_backward": []} for name in CONTENDERS}
    for _ in range(warmup):
        for module in modules.values():
            run_once(module, x, backward=True)
    for _ in range(repeats):
        for mode, backward in (("forward", False), ("forward_backward", True)):
            for name, module in modules.items():  # interleaved: drift hits every variant alike
                times[name][mode].append(timed(module, x, backward, device))
    # The modules are warm, so their gradients exist: the state shape_memory measures in.
    peak = {name: peak_memory_mib(module, x, device) for name, module in modules.items()} if memory else dict.fromkeys(CONTENDERS)
    median = {name: {mode: statistics.median(v) for mode, v in t.items()} for name, t in times.items()}
    base = median["standard"]["forward_backward"]
    row = {
        "length": length,
        "d_model": d_model,
        "n_heads": n_heads,
        "batch": x.shape[0],
        "dtype": str(dtype).replace("torch.", ""),
        "median_seconds": median,
        "peak_memory_mib": peak,
        "ratio_to_standard": {name: median[name]["forward_backward"] / base for name in CONTENDERS},
        "forward_ratio_to_standard": {name: median[name]["forward"] / median["standard"]["forward"] for name in CONTENDERS},
        "mac_ratio": {v: macs(v, d_model, length) / macs("standard", d_model, length) for v in VARIANTS},
    }
    row["mac_ratio"]["torch_mha"] = 1.0
    return row


def speedup_interval(baseline: list[float], ours: list[float]) -> tuple[float, float, float, str]:
    """The speed-up ``baseline / ours`` from paired per-round times: estimate, 95 % interval, verdict.

    Each round times both side by side, so its ratio cancels the machine's drift. The estimate is
    the geometric mean of the rounds' ratios and the interval Student's for it (a t-interval of
    their logarithms, ``len - 1`` degrees of freedom): the paired counterpart of the book's rule.
    The verdict is ``"faster"`` or ``"slower"`` only when the interval excludes 1, else
    ``"no detectable difference"``.
    """
    if len(baseline) != len(ours) or len(ours) < 2:
        raise ValueError(f"need two equally long lists of at least 2 rounds, got {len(baseline)} and {len(ours)}")
    if not all(t > 0 for t in (*baseline, *ours)):
        raise ValueError("every time must be positive")
    from scipy import stats

    logs = [math.log(b / o) for b, o in zip(baseline, ours)]
    centre = statistics.fmean(logs)
    half = float(stats.t.ppf(0.975, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
    low, high = math.exp(centre - half), math.exp(centre + half)
    verdict = "faster" if low > 1 else "slower" if high < 1 else "no detectable difference"
    return math.exp(centre), low, high, verdict


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """A benchmark script's check of its counts: ``parser.error`` (one line, exit 2) for the first
    option below its minimum, e.g. ``{"threads": 1, "rounds": 2}``."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
