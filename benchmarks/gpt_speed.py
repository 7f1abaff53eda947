"""Training speed of the character-level GPT: pba against plain nanoGPT-style code, and per variant.

    python benchmarks/gpt_speed.py --threads 2 --out results/bench-gpt-speed.json

One training iteration is forward + cross-entropy + backward + AdamW step on a batch of 12 blocks of
64 characters (vocabulary 65), for the default :class:`pba.models.GPTConfig` (4 layers, 4 heads,
width 128, tied head, biases, no dropout). Contenders, timed side by side in one process:

``plain``
    :class:`PlainGPT` below: the same model written plainly, as nanoGPT writes it: one ``nn.Linear``
    for ``W^Q, W^K, W^V`` together, ``F.scaled_dot_product_attention(is_causal=True)``, the same
    shapes, initialisation, tied head and AdamW parameter groups. It is the baseline the
    requirement names: pba's GPT with the standard variant must train at least as fast.
``plain-apart``
    The plain model with ``W^Q, W^K, W^V`` as three ``nn.Linear`` layers, the layout pba keeps
    (:class:`PlainAttentionApart`). It is not a requirement but a diagnosis: against ``plain`` it
    measures what the layout costs, and against pba's standard GPT what the library costs beyond it.
``standard``, ``optimised``, ``efficient``, ``super``
    :class:`pba.models.GPT` with each attention variant.

Every round runs ``--steps`` iterations of every contender (the order rotates each round, so drift
and cache effects hit all alike), after ``--warmup`` untimed iterations each; the tables give the
medians over ``--rounds`` rounds. The speed-up of pba over plain is reported as the ratio of the
medians, as the median of the per-round ratios, and as the geometric mean of the per-round ratios
with its 95 % interval (:func:`pba.benchmark.speedup_interval`); the layout and the library are
judged the same way (``plain-apart`` against ``plain``, pba's standard against ``plain-apart``).

Multiply-adds (MACs) per iteration count the forward pass: per layer the attention
(:func:`pba.costs.macs`: projections, scores, weighted sum and super's ``W^A X``) and the MLP
(``8 l C^2``), plus the head (``l C V``), times the batch; embeddings, LayerNorm, softmax, GELU,
biases and the loss are not counted. Backward costs about twice the forward, so an iteration is
about three times the forward count (the AdamW step is ``O(parameters)``, not counted). The causal
kernel may skip the masked half of the scores, and super's ``tril(W^A) X`` is a full ``l x l``
product here, so the counts are an upper bound for the attention's score part.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pba
from pba.benchmark import require_at_least, speedup_interval
from pba.costs import macs
from pba.experiments.grid import environment
from pba.experiments.shakespeare import ShakespeareSettings
from pba.files import write_json_atomic, write_text_atomic
from pba.models import GPT, GPTConfig
from pba.train import AutogradEngine, LanguageModeling

BATCH, BLOCK, VOCAB = 12, 64, 65
CONTENDERS = ("plain", "plain-apart", *pba.VARIANTS)


# ----------------------------------------------------------------------------------- baseline
class PlainSelfAttention(nn.Module):
    """Causal multi-head self-attention written plainly; a subclass says how it stores ``W^Q, W^K, W^V``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W^O

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape  # (B, T, C)
        q, k, v = self.qkv(x)  # 3 x (B, T, C)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, C/h)
        return self.c_proj(y.transpose(1, 2).reshape(batch, length, width))  # (B, T, C)


class PlainAttention(PlainSelfAttention):
    """As nanoGPT writes it: one ``nn.Linear``, ``c_attn``, holds ``W^Q, W^K, W^V`` side by side."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.c_attn(x).split(x.shape[-1], dim=2)  # 3 x (B, T, C)


class PlainAttentionApart(PlainSelfAttention):
    """``W^Q, W^K, W^V`` as three ``nn.Linear`` layers, the layout pba keeps."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.q_attn, self.k_attn, self.v_attn = (
            nn.Linear(config.n_embd, config.n_embd, bias=config.bias) for _ in range(3)
        )

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_attn(x), self.k_attn(x), self.v_attn(x)  # 3 x (B, T, C)


#: The plain contenders and their attention.
PLAIN: dict[str, type[PlainSelfAttention]] = {"plain": PlainAttention, "plain-apart": PlainAttentionApart}


class PlainBlock(nn.Module):
    def __init__(self, config: GPTConfig, attention: type[PlainSelfAttention]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """The standard-variant GPT written plainly: same shapes, init (nanoGPT's) and tied head.

    ``attention``: :class:`PlainAttention` (nanoGPT's packed ``c_attn``) or :class:`PlainAttentionApart`.
    """

    def __init__(self, config: GPTConfig, attention: type[PlainSelfAttention] = PlainAttention) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(config, attention) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.c_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------------- counts
def forward_macs(config: GPTConfig, batch: int) -> int:
    """Multiply-adds of one forward pass over ``batch`` full blocks (see the module docstring)."""
    length, width = config.block_size, config.n_embd
    attention = macs(config.variant, width, length)
    mlp = 2 * length * width * 4 * width  # c_fc and c_proj
    head = length * width * config.vocab_size
    return batch * (config.n_layer * (attention + mlp) + head)


# ----------------------------------------------------------------------------------- timing
class Trainer:
    """One contender: its model, a fixed batch, and the training step the grid runs
    (:class:`pba.train.AutogradEngine` with the recipe's AdamW and clipping); :meth:`steps` times
    ``n`` iterations."""

    def __init__(self, name: str, seed: int) -> None:
        self.config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, variant="standard" if name in PLAIN else name)
        torch.manual_seed(seed)
        self.model = PlainGPT(self.config, PLAIN[name]) if name in PLAIN else GPT(self.config)
        self.model.train()
        settings = ShakespeareSettings()
        generator = torch.Generator().manual_seed(seed)
        stream = torch.randint(0, VOCAB, (BATCH * (BLOCK + 1) + 1,), generator=generator)
        task = LanguageModeling(stream, stream, block_size=BLOCK, steps_per_round=1)
        self.engine = AutogradEngine(self.model, settings.train_config("cpu", None, False), task)
        self.x, self.y = task.batch("train", torch.arange(BATCH) * (BLOCK + 1))  # (B, T) each
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        losses, _ = self.engine.step(self.x, self.y, lr=1e-3)
        return losses.item()

    def steps(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        return (time.perf_counter() - start) / n


def check_same_function() -> tuple[float, float]:
    """Largest |logit| difference from PlainGPT of pba's standard GPT and of the plain-apart model, all
    holding the same weights: PlainGPT's, every one first redrawn (biases and LayerNorms too, so that a
    weight left uncopied shows)."""
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK)
    plain, apart, ours = PlainGPT(config).eval(), PlainGPT(config, PlainAttentionApart).eval(), GPT(config).eval()
    width = config.n_embd
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.normal_(0.0, 0.1)
        apart_maps = {f"blocks.{i}.attn.{m}_attn.{p}" for i in range(config.n_layer) for m in "qkv" for p in ("weight", "bias")}
        packed = {f"blocks.{i}.attn.c_attn.{p}" for i in range(config.n_layer) for p in ("weight", "bias")}
        keys = apart.load_state_dict(plain.state_dict(), strict=False)  # all but W^Q, W^K, W^V: copied below
        if set(keys.missing_keys) != apart_maps or set(keys.unexpected_keys) != packed:
            raise RuntimeError(f"plain-apart's parameters moved: missing {keys.missing_keys}, unexpected {keys.unexpected_keys}")
        ours.tok_emb.weight.copy_(plain.tok_emb.weight)  # the head too: tied
        ours.pos_emb.weight.copy_(plain.pos_emb.weight)
        ours.ln_f.load_state_dict(plain.ln_f.state_dict())
        for a, apart_block, b in zip(plain.blocks, apart.blocks, ours.blocks):
            b.ln_1.load_state_dict(a.ln_1.state_dict())
            b.ln_2.load_state_dict(a.ln_2.state_dict())
            b.mlp.c_fc.load_state_dict(a.c_fc.state_dict())
            b.mlp.c_proj.load_state_dict(a.c_proj.state_dict())
            b.attn.out_proj.load_state_dict(a.attn.c_proj.state_dict())
            separate = (apart_block.attn.q_attn, apart_block.attn.k_attn, apart_block.attn.v_attn)
            for i, (theirs, mine) in enumerate(zip(separate, (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj))):
                rows = slice(i * width, (i + 1) * width)  # c_attn's rows of W^Q, W^K, W^V in turn
                for proj in (theirs, mine):
                    proj.weight.copy_(a.attn.c_attn.weight[rows])
                    proj.bias.copy_(a.attn.c_attn.bias[rows])
        copied = sum(p.numel() for p in ours.parameters())
        if copied != sum(p.numel() for p in plain.parameters()):
            raise RuntimeError("pba's GPT and PlainGPT no longer have the same number of weights")
        ids = torch.randint(0, VOCAB, (2, BLOCK))
        reference = plain(ids)
        return (ours(ids) - reference).abs().max().item(), (apart(ids) - reference).abs().max().item()


def profile_difference(steps: int = 20, rows: int = 15) -> str:
    """Where the three standard models differ, operator by operator (``torch.profiler``).

    ``plain``, ``plain-apart`` and pba's standard GPT each run ``steps`` training iterations after a
    short warm-up, one after another (not paired, so operators that all three call equally often
    differ by noise). The table lists the operators whose self CPU time differs most between
    neighbours (microseconds and calls per iteration): ``apart - plain`` is the layout, ``pba - apart``
    the library. Then the totals, and the parameter tensors each model hands to AdamW and clipping.
    """
    from torch.profiler import ProfilerActivity, profile

    names = ("plain", "plain-apart", "standard")
    measured, tensors = {}, {}
    for name in names:
        trainer = Trainer(name, seed=0)
        trainer.steps(5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.steps(steps)
        measured[name] = {e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in prof.key_averages()}
        tensors[name] = sum(1 for _ in trainer.model.parameters())

    def cell(name: str, key: str) -> tuple[float, float]:
        return measured[name].get(key, (0.0, 0.0))

    def gaps(key: str) -> tuple[float, float]:
        plain, apart, ours = (cell(n, key)[0] for n in names)
        return apart - plain, ours - apart

    keys = sorted(set().union(*measured.values()), key=lambda k: -max(abs(g) for g in gaps(k)))
    lines = [f"{'operator':<60} {'plain us':>9} {'calls':>6} {'apart us':>9} {'calls':>6} {'pba us':>9} {'calls':>6} "
             f"{'apart - plain':>13} {'pba - apart':>11}"]
    for key in keys[:rows]:
        values = " ".join(f"{t:>9.1f} {c:>6.1f}" for t, c in (cell(n, key) for n in names))
        layout, library = gaps(key)
        lines.append(f"{key[:60]:<60} {values} {layout:>+13.1f} {library:>+11.1f}")
    totals = [(sum(t for t, _ in measured[n].values()), sum(c for _, c in measured[n].values())) for n in names]
    values = " ".join(f"{t:>9.1f} {c:>6.0f}" for t, c in totals)
    lines.append(f"{'all operators (self time, calls per iteration)':<60} {values} "
                 f"{totals[1][0] - totals[0][0]:>+13.1f} {totals[2][0] - totals[1][0]:>+11.1f}")
    lines.append(f"parameter tensors (AdamW, clipping): plain {tensors['plain']}, plain-apart {tensors['plain-apart']}, "
                 f"pba {tensors['standard']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians over them (default 9)")
    parser.add_argument("--steps", type=int, default=20, help="iterations per contender per round (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per contender first (default 5)")
    parser.add_argument("--out", help="also write the results as JSON, e.g. results/bench-gpt-speed.json")
    parser.add_argument("--profile-out",
                        help="also profile plain, plain-apart and pba's standard GPT, e.g. results/profile-gpt-step.txt")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"threads": 1, "rounds": 2, "steps": 1, "warmup": 0})  # two rounds for an interval
    torch.set_num_threads(args.threads)
    command = "python benchmarks/gpt_speed.py " + " ".join(shlex.quote(a) for a in argv)
    print("command: " + command)
    print(
        f"threads {args.threads}, batch {BATCH}, block {BLOCK}, vocab {VOCAB}, 4 layers, 4 heads, width 128; "
        f"{args.rounds} rounds x {args.steps} steps, {args.warmup} warm-up steps"
    )
    difference, apart_difference = check_same_function()
    print(f"pba standard and plain-apart against plain, the same weights: max |logit difference| "
          f"{difference:.2e} and {apart_difference:.2e}")

    trainers = {name: Trainer(name, seed=0) for name in CONTENDERS}
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.step()
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        for name in order:
            times[name].append(trainers[name].steps(args.steps))

    median = {name: statistics.median(t) for name, t in times.items()}
    paired = statistics.median(p / s for p, s in zip(times["plain"], times["standard"]))
    rows = []
    print(f"\n{'contender':<11} {'params':>8} {'fwd MMAC':>9} {'iter GMAC':>10} {'ms/iter':>8} "
          f"{'vs standard':>12} {'MAC ratio':>10} {'GMAC/s':>7}")
    base_macs = forward_macs(trainers["standard"].config, BATCH)
    for name in CONTENDERS:
        trainer = trainers[name]
        fwd = forward_macs(trainer.config, BATCH)
        seconds = median[name]
        row = {
            "contender": name,
            "parameters": trainer.parameters,
            "forward_macs": fwd,
            "iteration_macs_estimate": 3 * fwd,
            "median_seconds_per_iteration": seconds,
            "seconds_per_iteration": times[name],
            "time_ratio_to_standard": seconds / median["standard"],
            "mac_ratio_to_standard": fwd / base_macs,
            "gmacs_per_second": 3 * fwd / seconds / 1e9,
        }
        rows.append(row)
        print(
            f"{name:<11} {trainer.parameters:>8,} {fwd / 1e6:>9.1f} {3 * fwd / 1e9:>10.3f} {seconds * 1e3:>8.2f} "
            f"{row['time_ratio_to_standard']:>11.3f}x {row['mac_ratio_to_standard']:>9.3f}x "
            f"{row['gmacs_per_second']:>7.1f}"
        )
    speedup = median["plain"] / median["standard"]
    geometric, low, high, verdict = speedup_interval(times["plain"], times["standard"])
    print(
        f"\npba standard vs plain nanoGPT-style: speed-up {speedup:.3f}x (ratio of medians), "
        f"{paired:.3f}x (median of per-round ratios); >= 1 means pba trains at least as fast"
    )
    print(f"geometric mean of the {args.rounds} per-round ratios {geometric:.3f}, 95 % interval "
          f"{low:.3f} to {high:.3f}: {verdict}")
    layout = speedup_interval(times["plain"], times["plain-apart"])  # what three maps cost plain code
    library = speedup_interval(times["plain-apart"], times["standard"])  # what pba costs beyond that layout
    for label, (g, lo, hi, v) in (("plain-apart vs plain (the layout)", layout),
                                  ("pba standard vs plain-apart (the library)", library)):
        print(f"{label}: speed-up {g:.3f}, 95 % interval {lo:.3f} to {hi:.3f}: {v}")
    if args.out:
        machine = environment("cpu")
        machine["threads"] = args.threads
        payload = {
            "command": command,
            "environment": machine,
            "settings": {
                "rounds": args.rounds,
                "steps": args.steps,
                "warmup": args.warmup,
                "batch": BATCH,
                "config": dataclasses.asdict(trainers["standard"].config),
            },
            "same_weights_max_logit_difference": difference,
            "same_weights_max_logit_difference_apart": apart_difference,
            "speedup_standard_over_plain": speedup,
            "speedup_standard_over_plain_paired": paired,
            "speedup_geometric_mean": geometric,
            "speedup_interval_95": [low, high],
            "speedup_verdict": verdict,
            "layout_speedup": dict(zip(("geometric_mean", "low", "high", "verdict"), layout)),
            "library_speedup": dict(zip(("geometric_mean", "low", "high", "verdict"), library)),
            "rows": rows,
        }
        write_json_atomic(Path(args.out), payload)
        print(f"wrote {args.out}")
    if args.profile_out:
        text = profile_difference()
        print("\n" + text)
        write_text_atomic(Path(args.profile_out), f"command: {command}\n{machine_line(args.threads)}\n\n{text}\n")
        print(f"wrote {args.profile_out}")
    return 0


def machine_line(threads: int) -> str:
    machine = environment("cpu")
    return f"{machine['processor']}, {threads} thread(s), torch {machine['torch']}, {machine['date']}"


if __name__ == "__main__":
    raise SystemExit(main())
