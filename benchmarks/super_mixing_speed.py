"""Super attention's ``W^A X``, three ways, timed side by side.

    python benchmarks/super_mixing_speed.py --out results/bench-super-mixing.json

* ``wa @ x``: what :class:`pba.SuperAttention` computes. PyTorch evaluates a matrix times a batch
  of matrices by copying ``x`` into one ``(B d) x L`` matrix and the result back, forward and
  backward; its ``dW^A`` is one ``(L, B d) @ (B d, L)`` product.
* ``bmm(expand)``: ``torch.bmm(wa.expand(B, L, L), x)`` with PyTorch's own backward: no copy of
  ``x``, and ``dW^A`` as ``B`` products ``dY_b X_b^T`` summed, which rounds differently.
* ``Function``: a hand-written ``torch.autograd.Function`` (forward as ``bmm(expand)``, backward
  with ``dW^A`` as ``wa @ x`` computes it), which an earlier ``pba`` used. Autocast, ``torch.jit``,
  ``torch.export`` and forward-mode AD cannot see through it; they see through the other two.

Each is timed, interleaved round by round, in three settings:

* ``product``: ``W^A X`` forward and backward alone, at the IMDB step's shape;
* ``product large``: the same at chapter 5's larger shape (``l = 128``, ``d_m = 512``, batch 64);
* ``imdb step``: one training step of the paper's IMDB classifier with super attention (forward,
  loss, backward, Adam) on a batch of the protocol's shape (random token ids; the step's cost does
  not depend on which tokens they are), each contender in its own copy of one model.

It prints the median time of each, its ratio to ``wa @ x``, and each copy's loss after the same
steps on the same batches with the same dropout masks.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import pba
from pba.experiments import ImdbSettings
from pba.experiments.grid import environment
from pba.files import write_json_atomic


class ExpandedProduct(torch.autograd.Function):
    """``W^A X`` for each item, ``(L, L), (B, L, d) -> (B, L, d)``, with its backward written out.

    forward ``Y_b = W^A X_b`` (one batched product over stride-0 views of ``W^A``);
    backward ``dX_b = (W^A)^T dY_b`` and ``dW^A = sum_b dY_b X_b^T`` as one ``(L, B d) @ (B d, L)``.
    """

    @staticmethod
    def forward(wa: Tensor, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return torch.bmm(wa.expand(batch, length, length), x)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        wa, x = ctx.saved_tensors
        batch, length, d = x.shape
        grad_wa = (x.mT.reshape(batch * d, length).t() @ grad.mT.reshape(batch * d, length)).t()
        grad_x = torch.bmm(wa.mT.expand(batch, length, length), grad)
        return grad_wa, grad_x


PRODUCTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "wa @ x": lambda wa, x: wa @ x,
    "bmm(expand)": lambda wa, x: torch.bmm(wa.expand(x.shape[0], *wa.shape), x),
    "Function": ExpandedProduct.apply,
}


def super_attention_with(product: Callable[[Tensor, Tensor], Tensor]) -> type[pba.SuperAttention]:
    """A :class:`pba.SuperAttention` whose layer-shared ``W^A X`` is ``product``."""

    class Mixed(pba.SuperAttention):
        def project_value(self, value: Tensor, is_causal: bool) -> Tensor:
            return product(self.effective_wa(value.shape[1], is_causal), value)

    return Mixed


def product_seconds(product, wa: Tensor, x: Tensor, upstream: Tensor, repeats: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(repeats):
        w, xx = wa.detach().requires_grad_(), x.detach().requires_grad_()
        product(w, xx).backward(upstream)
    return (time.perf_counter() - start) / repeats


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor, labels: Tensor, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(repeats):
        loss = F.binary_cross_entropy_with_logits(model(ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / repeats, loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--repeats", type=int, default=40, help="calls per round and contender (default 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = ImdbSettings()
    batch, length, d_model = settings.batch_size, 32, 32  # the paper's IMDB protocol
    model = settings.model("super", vocab_size=20_000, context_length=length)
    attention = model.blocks[0].attention
    assert attention.wa_sharing == "layer" and attention.wa_bias is None
    trainees = {}
    for name, product in PRODUCTS.items():
        copied = copy.deepcopy(model)
        copied.blocks[0].attention.__class__ = super_attention_with(product)
        trainees[name] = (copied, torch.optim.Adam(copied.parameters(), lr=settings.lr))
    ids = torch.randint(1, 20_000, (batch, length))
    ids[batch // 2 :, length // 2 :] = 0  # half the reviews padded, as short reviews are
    labels = torch.randint(0, 2, (batch,)).float()
    small = torch.randn(length, length), torch.randn(batch, length, d_model), torch.randn(batch, length, d_model)
    large = torch.randn(128, 128), torch.randn(64, 128, 512), torch.randn(64, 128, 512)

    settings_timed = ("product", "product large", "imdb step")
    times = {setting: {name: [] for name in PRODUCTS} for setting in settings_timed}
    losses: dict[str, float] = {}
    for name, product in PRODUCTS.items():  # warm-up
        product_seconds(product, *small, 5)
        product_seconds(product, *large, 1)
        torch.manual_seed(0)
        step_seconds(*trainees[name], ids, labels, 1)
    for round_ in range(args.rounds):
        order = list(PRODUCTS)[round_ % 3 :] + list(PRODUCTS)[: round_ % 3]
        for name in order:
            times["product"][name].append(product_seconds(PRODUCTS[name], *small, args.repeats))
        for name in order:
            times["product large"][name].append(product_seconds(PRODUCTS[name], *large, max(1, args.repeats // 20)))
        for name in order:
            torch.manual_seed(round_)  # the same dropout masks for every copy
            seconds, losses[name] = step_seconds(*trainees[name], ids, labels, args.repeats)
            times["imdb step"][name].append(seconds)

    medians = {setting: {name: statistics.median(by[name]) for name in PRODUCTS} for setting, by in times.items()}
    print(f"IMDB step: batch {batch}, length {length}, d_model {d_model}; threads {torch.get_num_threads()}; "
          f"{args.rounds} rounds x {args.repeats} calls, interleaved; median time / wa @ x's")
    print(f"{'':<14}" + "".join(f"{name:>14}" for name in PRODUCTS) + f"{'wa @ x (us)':>16}")
    for setting, by in medians.items():
        base = by["wa @ x"]
        print(f"{setting:<14}" + "".join(f"{by[name] / base:>14.3f}" for name in PRODUCTS) + f"{1e6 * base:>16.1f}")
    steps = 1 + args.rounds * args.repeats
    print(f"loss after {steps} steps: " + ", ".join(f"{name} {loss:.9f}" for name, loss in losses.items()))
    if args.out is not None:
        write_json_atomic(
            args.out,
            {
                "command": "python " + shlex.join(["benchmarks/super_mixing_speed.py", *(argv if argv is not None else sys.argv[1:])]),
                "environment": environment("cpu"),
                "threads": torch.get_num_threads(),
                "imdb_step_shape": {"batch": batch, "length": length, "d_model": d_model},
                "rounds": args.rounds,
                "repeats": args.repeats,
                "median_seconds": medians,
                "ratio_to_matmul": {
                    setting: {name: by[name] / by["wa @ x"] for name in PRODUCTS} for setting, by in medians.items()
                },
                "steps": steps,
                "final_losses": losses,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
