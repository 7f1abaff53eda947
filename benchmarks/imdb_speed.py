"""IMDB training speed: pba's loop against a baseline built the way the reference code is built.

    PBA_IMDB_DIR=../shared/data/imdb python benchmarks/imdb_speed.py --epochs 1

The baseline re-creates the costs of the reference reimplementation's design with the same model,
data and optimiser: one module per head with its own projections and a Python loop over heads,
``torch.cat`` of head outputs, a ``DataLoader`` that collates variable-length reviews with
``pad_sequence`` for every batch, the default (non-fused) Adam, a host sync per step to accumulate
metrics, and a ``torch.save`` checkpoint whenever validation improves. It is written for this
benchmark (it is not the reference's code), so its time is an estimate of that design's cost, not
of the reference script itself (which took 33 min 20 s for the full protocol on this kind of
machine).

Both sides train the same number of steps (a shortened protocol: ``--epochs`` per variant, one
seed) in one process with the same thread count; the ratio is printed side by side. With
``--stack N`` a third column times ``pba.train.fit`` training seeds (stacked) 0 .. N-1 of each
variant together, as seconds per seed (the stack's time over N): what stacking saves or costs here.
With ``--fused`` another column times the same loop with ``engine="fused"`` (``pba.fused``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

import pba
from pba.data import prepare_imdb
from pba.experiments import ImdbSettings, run_one, run_stack
from pba.experiments.grid import environment
from pba.files import write_json_atomic
from pba.train import BinaryClassification, evaluate


class HeadLoopAttention(nn.Module):
    """One module per head (the reference's layout): heads computed one after another."""

    def __init__(self, variant: str, d_model: int, n_heads: int, length: int) -> None:
        super().__init__()
        self.variant, self.n_heads, self.d_k = variant, n_heads, d_model // n_heads
        learned = pba.attention.learned_projections(variant)

        def per_head() -> nn.ModuleList:
            return nn.ModuleList(nn.Linear(d_model, self.d_k) for _ in range(n_heads))

        self.queries = per_head()
        self.keys = per_head() if "k" in learned else None
        self.values = per_head() if "v" in learned else None
        self.wa = nn.Linear(length, length) if "a" in learned else None
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = None
        for i in range(self.n_heads):
            block = slice(i * self.d_k, (i + 1) * self.d_k)
            q = self.queries[i](x)
            k = self.keys[i](x) if self.keys is not None else x[:, :, block]
            v = self.values[i](x) if self.values is not None else x[:, :, block]
            if self.wa is not None:
                v = self.wa(v.permute(0, 2, 1)).permute(0, 2, 1)
            weights = torch.softmax(q @ k.permute(0, 2, 1) / math.sqrt(self.d_k), dim=1)  # over queries
            head = weights @ v
            heads = head if heads is None else torch.cat((heads.clone(), head), 2)
        return self.out(heads)


class BaselineClassifier(pba.models.IMDBClassifier):
    """pba's classifier with the attention swapped for the head loop, quirks on."""

    def __init__(self, variant: str, vocab_size: int, length: int) -> None:
        super().__init__("standard", vocab_size=vocab_size, context_length=length, padding_mask=False, masked_pooling=False)
        self.blocks[0].attention = HeadLoopAttention(variant, 32, 4, length)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1]))
        block = self.blocks[0]
        z = block.norm1(x + block.dropout1(block.attention(x)))
        x = block.norm2(z + block.dropout2(block.ffn(z)))
        return self.head(x.mean(1)).squeeze(-1)


def baseline_epochs(variant: str, splits, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    ids, labels = splits.train
    reviews = [row[row != 0] if (row != 0).any() else row[:1] for row in ids]  # variable length, as read
    dataset = list(zip(reviews, labels.tolist()))

    def collate(batch):
        texts, ys = zip(*batch)
        padded = pad_sequence(list(texts), batch_first=True)
        padded = F.pad(padded, (0, ids.shape[1] - padded.shape[1]))  # the position table wants l
        return padded, torch.tensor(ys, dtype=torch.float32)

    loader = DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=collate)
    model = BaselineClassifier(variant, len(splits.vocab), ids.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = -1.0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(epochs):
            model.train()
            correct = total = 0
            for batch, target in loader:
                optimizer.zero_grad()
                logits = model(batch)
                loss = F.binary_cross_entropy_with_logits(logits, target)
                loss.backward()
                optimizer.step()
                correct += ((logits > 0.5).float() == target).sum().item()  # a sync per step
                total += len(target)
            _, (val_acc,) = evaluate(model, BinaryClassification(splits.train, splits.val, threshold=0.5), "val", batch_size=64)
            if val_acc >= best:
                best = val_acc
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, os.path.join(tmp, "best.pth"))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(pba.VARIANTS), choices=pba.VARIANTS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--stack", type=int, default=0, help="also time N seeds trained together (N >= 2)")
    parser.add_argument("--fused", action="store_true", help="also time pba's loop with engine='fused' (pba.fused)")
    parser.add_argument("--out", help="also write the table as JSON (with command and environment)")
    args = parser.parse_args(argv)
    if args.stack == 1 or args.stack < 0:
        parser.error(f"--stack must be 0 (off) or at least 2, got {args.stack}")
    torch.set_num_threads(args.threads)
    settings = ImdbSettings.with_quirks(epochs=args.epochs)
    splits = prepare_imdb("seed", data_dir=args.data_dir, **settings.tokenizer_overrides())
    command = "python benchmarks/imdb_speed.py " + " ".join(shlex.quote(a) for a in argv)
    print("command: " + command)
    print(f"threads {args.threads}, {args.epochs} epoch(s) per variant, seed protocol, reference quirks on")
    header = f"{'variant':<10} {'baseline s':>11} {'pba s':>8} {'speed-up':>9}"
    if args.stack:
        header += f" {'stack s/seed':>13} {'speed-up':>9}"
    if args.fused:
        header += f" {'fused s':>8} {'speed-up':>9}"
    print(header)
    totals = {"base": 0.0, "ours": 0.0}
    totals.update({"stack": 0.0} if args.stack else {})
    totals.update({"fused": 0.0} if args.fused else {})
    rows = []
    for variant in args.variants:
        times = {
            "base": baseline_epochs(variant, splits, args.epochs, seed=0),
            "ours": run_one(variant, 0, splits, settings, device="cpu", num_threads=args.threads)["train_seconds"],
        }
        if args.stack:
            runs = run_stack(variant, range(args.stack), splits, settings, device="cpu", num_threads=args.threads)
            times["stack"] = runs[0]["train_seconds"]  # each replica's equal share of the stack's time
        if args.fused:
            fused = dataclasses.replace(settings, engine="fused")
            times["fused"] = run_one(variant, 0, splits, fused, device="cpu", num_threads=args.threads)["train_seconds"]
        for key, value in times.items():
            totals[key] += value
        rows.append({"variant": variant, **{f"{key}_seconds": value for key, value in times.items()}})
        print(_row(variant, times), flush=True)
    print(_row("all", totals))
    if args.out:
        machine = environment("cpu")
        machine["threads"] = args.threads
        payload = {"command": command, "epochs": args.epochs, "stack": args.stack, "environment": machine, "rows": rows}
        write_json_atomic(Path(args.out), payload)
    return 0


def _row(name: str, times: dict[str, float]) -> str:
    row = f"{name:<10} {times['base']:>11.1f} {times['ours']:>8.1f} {times['base'] / times['ours']:>8.2f}x"
    if "stack" in times:
        row += f" {times['stack']:>13.1f} {times['base'] / times['stack']:>8.2f}x"
    if "fused" in times:
        row += f" {times['fused']:>8.1f} {times['base'] / times['fused']:>8.2f}x"
    return row


if __name__ == "__main__":
    raise SystemExit(main())
