"""A floor under one IMDB training step on this CPU, built from torch's own kernels, beside pba's step.

    python benchmarks/imdb_floor.py --out results/imdb-floor.json

The seed protocol trains 4 variants x 5 seeds x 10 epochs of 625 steps, batch 64, on 2 cores. This
script asks how fast any implementation built from torch's CPU kernels could run those steps. For
each variant it times, alone and at the step's shapes, the kernels such an implementation cannot
skip:

* the embedding: the gather, and the dense gradient of its 20,000 x 32 table (zeroed, then summed into);
* every learned projection (``W^Q``, and ``W^K``, ``W^V`` where the variant learns them; super
  attention's ``W^A``), the output projection and the two FFN layers: the forward product and the
  two gradient products (MKL's ``mm``);
* the six batched products of attention (scores, weighted values, and four in the backward), each
  in the faster of its two orientations;
* the softmax over ``B*h*L*L`` scores and its backward;
* the two layer norms, forward and backward;
* the uniform random numbers of the four dropouts (the faster of ``torch.rand`` and NumPy's PCG64);
* one fused Adam step over the variant's parameters (every one of them: plain Adam, dense).

Each kernel is timed in ``--rounds`` interleaved rounds of ``--reps`` calls, and its floor is the
smallest of the rounds' medians. The sum leaves out everything else a step does (bias adds, ReLU,
residual sums, the classifier head, copies between head layouts, the loss, autograd, Python), and
evaluation, and it is timed with the second core idle: a floor that only an engine with faster
kernels than torch's could go below. pba's own training step (forward, loss, backward, Adam, the
reference's settings, as the reference-quirks grid runs it) is timed the same way beside it, and so is the same step
through ``pba.fused`` (its C++ engine and Adam; the row is left out where it cannot be built).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pba
from pba.benchmark import require_at_least
from pba.experiments import ImdbSettings
from pba.experiments.grid import environment
from pba.files import write_json_atomic
from pba.train import TrainConfig, make_optimizer, seed_everything

BATCH, LENGTH, D_MODEL, N_HEADS, D_FF = 64, 32, 32, 4, 32
VOCAB = 20_000
TRAIN_REVIEWS, EPOCHS, SEEDS, CORES = 40_000, 10, 5, 2


def projection_width(variant: str) -> int:
    """The learned input projections' total output width (``W^Q``, and ``W^K``, ``W^V`` if learned)."""
    return D_MODEL * sum(name in ("q", "k", "v") for name in pba.attention.learned_projections(variant))


def _median_seconds(call: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _linear(rows: int, d_in: int, d_out: int) -> Callable[[], None]:
    """``Y = X W^T``, ``dW = dY^T X``, ``dX = dY W``: one linear layer's three products."""
    x, w, dy = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(rows, d_out)

    def run() -> None:
        torch.mm(x, w.t())
        torch.mm(dy.t(), x)
        torch.mm(dy, w)

    return run


def _attention_products() -> Callable[[], None]:
    """Scores and ``dP`` (square outputs) and the four 8-wide products, each in its faster form."""
    bh, d_k = BATCH * N_HEADS, D_MODEL // N_HEADS
    q, kt = torch.randn(bh, LENGTH, d_k), torch.randn(bh, d_k, LENGTH)
    weights, values_t = torch.randn(bh, LENGTH, LENGTH), torch.randn(bh, d_k, LENGTH)
    narrow_forms = (lambda: torch.bmm(weights, values_t.mT), lambda: torch.bmm(values_t, weights))
    for form in narrow_forms:
        form()  # warm both
    narrow = min(narrow_forms, key=lambda form: _median_seconds(form, 30))

    def run() -> None:
        torch.bmm(q, kt)  # S = Q K^T
        torch.bmm(q, kt)  # dP = dO V^T
        for _ in range(4):  # O = P V, dV = P^T dO, dQ = dS K, dK = dS^T Q
            narrow()

    return run


def _softmax() -> Callable[[], None]:
    scores = torch.randn(BATCH * N_HEADS, LENGTH, LENGTH)
    probs, grad = torch.softmax(scores, -1), torch.randn_like(scores)

    def run() -> None:
        torch.softmax(scores, -1)
        torch._softmax_backward_data(grad, probs, -1, torch.float32)

    return run


def _layer_norms() -> Callable[[], None]:
    x, dy = torch.randn(BATCH * LENGTH, D_MODEL), torch.randn(BATCH * LENGTH, D_MODEL)
    weight, bias = torch.ones(D_MODEL), torch.zeros(D_MODEL)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [D_MODEL], weight, bias, 1e-6)

    def run() -> None:
        for _ in range(2):
            torch.ops.aten.native_layer_norm(x, [D_MODEL], weight, bias, 1e-6)
            torch.ops.aten.native_layer_norm_backward(
                dy, x, [D_MODEL], mean, rstd, weight, bias, [True, True, True]
            )

    return run


def _dropout_draws() -> Callable[[], None]:
    """Uniform numbers for the four dropouts (two after sublayers, two in the head)."""
    sizes = (BATCH * LENGTH * D_MODEL, BATCH * LENGTH * D_MODEL, BATCH * D_MODEL, BATCH * 6)
    generator = np.random.default_rng(0)
    forms = (
        lambda: [torch.rand(n) for n in sizes],
        lambda: [torch.from_numpy(generator.random(n, dtype=np.float32)) for n in sizes],
    )
    for form in forms:
        form()
    return min(forms, key=lambda form: _median_seconds(form, 30))


def _embedding() -> Callable[[], None]:
    table, grad_table = torch.randn(VOCAB, D_MODEL), torch.zeros(VOCAB, D_MODEL)
    ids = torch.randint(0, VOCAB, (BATCH * LENGTH,))
    grad = torch.randn(BATCH * LENGTH, D_MODEL)

    def run() -> None:
        table.index_select(0, ids)
        grad_table.zero_().index_add_(0, ids, grad)

    return run


def _model(variant: str) -> torch.nn.Module:
    seed_everything(0)
    return ImdbSettings.with_quirks().model(variant, VOCAB, LENGTH)


def _adam_step(variant: str) -> Callable[[], None]:
    params = list(_model(variant).parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    return make_optimizer(params, TrainConfig(lr=1e-3)).step


def floor_kernels(variant: str) -> dict[str, Callable[[], None]]:
    """The unskippable kernels of one training step of ``variant``, by name."""
    tokens = BATCH * LENGTH
    kernels = {
        "embedding gather + dense gradient": _embedding(),
        "learned input projections": _linear(tokens, D_MODEL, projection_width(variant)),
    }
    if "a" in pba.attention.learned_projections(variant):
        kernels["W^A token mixing"] = _linear(BATCH * D_MODEL, LENGTH, LENGTH)
    linears = [_linear(tokens, D_MODEL, D_MODEL), _linear(tokens, D_MODEL, D_FF), _linear(tokens, D_FF, D_MODEL)]
    kernels["output projection + FFN"] = lambda: [linear() for linear in linears]
    kernels["attention products (6)"] = _attention_products()
    kernels["softmax + backward"] = _softmax()
    kernels["layer norms (2) + backward"] = _layer_norms()
    kernels["dropout random numbers"] = _dropout_draws()
    kernels["fused Adam, all parameters"] = _adam_step(variant)
    return kernels


def pba_step(variant: str) -> Callable[[], None]:
    """pba's training step with the reference's settings, on random token ids."""
    model = _model(variant)
    optimizer = make_optimizer(list(model.parameters()), TrainConfig(lr=1e-3))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator).float()

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(model(ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fused_step(variant: str) -> Callable[[], None] | None:
    """The same step through pba.fused (C++), or None where its extension cannot be built."""
    try:
        from pba.fused import FusedAdam, FusedIMDBStep, load_extension

        load_extension()
    except Exception as error:  # noqa: BLE001 (no compiler, no ninja, ...)
        print(f"pba.fused unavailable, its row is left out: {error}", file=sys.stderr)
        return None
    model = _model(variant)
    engine = FusedIMDBStep(model, seed=0)
    optimizer = FusedAdam(engine, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator).float()

    def step() -> None:
        engine.step(ids, labels)
        optimizer.step()

    return step


def measure(variant: str, rounds: int, reps: int) -> dict[str, object]:
    """Floor of each kernel and of pba's steps (ms): the least over rounds of each round's median."""
    calls = {**floor_kernels(variant), "pba training step": pba_step(variant)}
    fused = fused_step(variant)
    if fused is not None:
        calls["pba fused step"] = fused
    for call in calls.values():  # warm-up
        for _ in range(5):
            call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            best[name] = min(best[name], _median_seconds(call, reps) * 1e3)
    step_ms = best.pop("pba training step")
    fused_ms = best.pop("pba fused step", None)
    floor_ms = sum(best.values())
    return {"kernels_ms": best, "floor_ms": floor_ms, "pba_step_ms": step_ms, "fused_step_ms": fused_ms}


def protocol_minutes(ms_per_step: dict[str, float]) -> float:
    """Minutes for the seed protocol's training steps of every variant, spread over ``CORES``."""
    steps = -(-TRAIN_REVIEWS // BATCH) * EPOCHS * SEEDS
    return sum(ms * steps for ms in ms_per_step.values()) / 1e3 / CORES / 60


def report(rows: dict[str, dict], command: str) -> str:
    lines = [f"command: {command}", f"torch {torch.__version__}, 1 thread; milliseconds per training step of {BATCH} reviews"]
    names = list(next(iter(rows.values()))["kernels_ms"])
    names += [name for row in rows.values() for name in row["kernels_ms"] if name not in names]
    lines.append(f"{'':<36}" + "".join(f"{v:>11}" for v in rows))
    for name in names:
        cells = (f"{row['kernels_ms'][name]:>11.3f}" if name in row["kernels_ms"] else f"{'-':>11}" for row in rows.values())
        lines.append(f"{name:<36}" + "".join(cells))
    lines.append(f"{'floor (sum)':<36}" + "".join(f"{row['floor_ms']:>11.3f}" for row in rows.values()))
    lines.append(f"{'pba training step':<36}" + "".join(f"{row['pba_step_ms']:>11.3f}" for row in rows.values()))
    lines.append(f"{'pba step / floor':<36}" + "".join(f"{row['pba_step_ms'] / row['floor_ms']:>11.2f}" for row in rows.values()))
    fused = all(row["fused_step_ms"] is not None for row in rows.values())
    if fused:
        lines.append(f"{'pba fused step (pba.fused)':<36}" + "".join(f"{row['fused_step_ms']:>11.3f}" for row in rows.values()))
        lines.append(f"{'fused step / floor':<36}" + "".join(f"{row['fused_step_ms'] / row['floor_ms']:>11.2f}" for row in rows.values()))
    floor_min = protocol_minutes({v: row["floor_ms"] for v, row in rows.items()})
    pba_min = protocol_minutes({v: row["pba_step_ms"] for v, row in rows.items()})
    lines += [
        f"seed protocol's training steps on {CORES} cores (no evaluation, no start-up; a whole grid also",
        "evaluates, starts its workers, and its two workers share the memory system):",
        f"  at the floor          {floor_min:6.2f} min",
        f"  at pba's step         {pba_min:6.2f} min",
    ]
    if fused:
        fused_min = protocol_minutes({v: row["fused_step_ms"] for v, row in rows.items()})
        lines.append(f"  at the fused step     {fused_min:6.2f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(pba.VARIANTS), choices=pba.VARIANTS)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--reps", type=int, default=60, help="calls per kernel per round (default 60)")
    parser.add_argument("--out", help="write the numbers and the printed table to this JSON file")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"rounds": 1, "reps": 1})
    torch.set_num_threads(1)
    rows = {variant: measure(variant, args.rounds, args.reps) for variant in args.variants}
    command = "python benchmarks/imdb_floor.py " + " ".join(shlex.quote(a) for a in argv)
    text = report(rows, command.strip())
    print(text)
    if args.out:
        write_json_atomic(
            Path(args.out),
            {
                "command": command.strip(),
                "environment": {**environment("cpu"), "threads": 1},
                "variants": rows,
                "protocol_minutes": {
                    "floor": protocol_minutes({v: r["floor_ms"] for v, r in rows.items()}),
                    "pba_steps": protocol_minutes({v: r["pba_step_ms"] for v, r in rows.items()}),
                    "fused_steps": (
                        protocol_minutes({v: r["fused_step_ms"] for v, r in rows.items()})
                        if all(r["fused_step_ms"] is not None for r in rows.values()) else None
                    ),
                },
                "text": text,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
