"""The classifier, the training loop, determinism, and the experiment grid (resume, CLI)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import pba
from pba.costs import count_parameters
from pba.data import prepare_imdb
from pba.experiments import ImdbSettings, run_grid
from pba.experiments.cli import main
from pba.models import IMDBClassifier
from pba.train import (
    BinaryClassification,
    Classification,
    LanguageModeling,
    TrainConfig,
    evaluate,
    fit,
    learning_rate,
    pick_device,
    seed_everything,
)

from .synthetic import write_imdb_like


def test_classifier_parameters_match_the_paper_setting() -> None:
    counts = {v: count_parameters(IMDBClassifier(v)) for v in pba.VARIANTS}
    # embedding 640,000 + positions 1,024 + LN 128 + FFN 2,112 + head 205, plus attention
    assert counts == {"standard": 647_693, "optimised": 646_637, "efficient": 645_581, "super": 646_605}


def test_classifier_masks_and_pooling() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    model = IMDBClassifier("super", vocab_size=10, context_length=8).eval()
    padded_differently = ids.clone()
    out = model(ids)
    assert out.shape == (1,)
    # With the padding mask and masked pooling, what padded positions hold cannot matter: a
    # longer run of padding (same real tokens) gives the same logit as a shorter input.
    assert torch.allclose(model(padded_differently[:, :3]), out, atol=1e-6)
    quirky = IMDBClassifier("super", vocab_size=10, context_length=8, padding_mask=False, masked_pooling=False)
    quirky.load_state_dict(model.state_dict())
    assert not torch.allclose(quirky.eval()(ids[:, :3]), quirky(ids), atol=1e-4)


def test_classifier_bad_input() -> None:
    model = IMDBClassifier("standard", vocab_size=10, context_length=4)
    with pytest.raises(ValueError, match=r"at most context_length=4 tokens, got 5"):
        model(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be an integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match="variant must be one of"):
        IMDBClassifier("sparse")


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="device must be 'auto' or a torch device name, got 'gpu0'"):
        pick_device("gpu0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    data_dir = write_imdb_like(root / "imdb", n_train=400, n_test=200)
    splits = prepare_imdb("paper", data_dir=data_dir, cache_dir=root / "cache", vocab_size=40, length=16)
    return data_dir, splits


def task_of(splits, threshold: float = 0.0) -> BinaryClassification:
    return BinaryClassification(splits.train, splits.val, splits.test, threshold=threshold)


def train_tiny(splits, variant: str, seed: int, epochs: int = 6):
    seed_everything(seed)
    model = IMDBClassifier(variant, vocab_size=len(splits.vocab), context_length=16, d_model=16, n_heads=2, d_ff=16)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, num_threads=1, progress=False)
    return model, fit(model, task_of(splits), config, seed=seed)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_learns_a_synthetic_task(tiny, variant: str) -> None:
    _, splits = tiny
    _, result = train_tiny(splits, variant, seed=0)
    assert result.test_acc > 0.9, result.history
    assert len(result.history) == 6 and 1 <= result.best_epoch <= 6
    assert result.val_acc == max(h["val_acc"] for h in result.history)


def test_same_seed_same_metrics_and_other_seed_differs(tiny) -> None:
    _, splits = tiny
    _, a = train_tiny(splits, "super", seed=3, epochs=2)
    _, b = train_tiny(splits, "super", seed=3, epochs=2)
    _, c = train_tiny(splits, "super", seed=4, epochs=2)
    assert a.history == b.history and a.test_acc == b.test_acc
    assert a.history != c.history


def test_threshold_changes_accuracy_only(tiny) -> None:
    _, splits = tiny
    model, _ = train_tiny(splits, "standard", seed=0, epochs=1)
    ids, y = splits.test
    (loss0,), (acc0,) = evaluate(model, task_of(splits, 0.0), "test")
    (loss5,), (acc5,) = evaluate(model, task_of(splits, 0.5), "test")
    with torch.no_grad():
        logits = model.eval()(ids)
    assert loss0 == loss5
    assert acc0 == pytest.approx(((logits > 0) == (y > 0.5)).float().mean().item())
    assert acc5 == pytest.approx(((logits > 0.5) == (y > 0.5)).float().mean().item())


def build_tiny(splits, variant: str, seed: int, **options):
    seed_everything(seed)
    return IMDBClassifier(variant, vocab_size=len(splits.vocab), context_length=16, d_model=16, n_heads=2, d_ff=16, **options)


TINY_CONFIG = TrainConfig(epochs=3, batch_size=16, lr=1e-2, num_threads=1, progress=False)


@pytest.mark.parametrize(
    ("variant", "options", "cancelling_bias"),
    [
        ("standard", {}, "blocks.0.attention.k_proj.bias"),  # b^K cancels in a key-axis softmax
        ("super", {}, None),
        ("super", {"softmax_over": "queries", "padding_mask": False}, "blocks.0.attention.q_proj.bias"),
    ],
)
def test_replicas_train_as_separate_runs_would(tiny, variant: str, options: dict, cancelling_bias: str | None) -> None:
    """Without dropout (whose masks are drawn per stack) a stack of replicas is ``fit`` run per seed."""
    _, splits = tiny
    seeds = [0, 1, 2]
    alone = [build_tiny(splits, variant, s, dropout=0.0, **options) for s in seeds]
    alone_results = [fit(m, task_of(splits), TINY_CONFIG, seed=s) for m, s in zip(alone, seeds)]
    stacked = [build_tiny(splits, variant, s, dropout=0.0, **options) for s in seeds]
    stacked_results = fit(stacked, task_of(splits), TINY_CONFIG, seeds=seeds)
    for a, b, model_a, model_b in zip(alone_results, stacked_results, alone, stacked):
        assert (a.best_epoch, a.val_acc, a.test_acc) == (b.best_epoch, b.val_acc, b.test_acc)
        for row_a, row_b in zip(a.history, b.history, strict=True):
            assert row_a["train_acc"] == row_b["train_acc"] and row_a["val_acc"] == row_b["val_acc"]
            assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], rel=1e-5)
            assert row_b["val_loss"] == pytest.approx(row_a["val_loss"], rel=1e-5)
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-5)
        with torch.no_grad():  # each model now holds its best epoch's weights, as after fit
            assert torch.allclose(model_a.eval()(splits.test[0]), model_b.eval()(splits.test[0]), atol=1e-4)
        for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
            # A bias whose gradient is zero up to rounding gets full-size Adam steps driven by that
            # rounding (m / sqrt(v) is O(1) whatever the scale), so it wanders differently; the
            # outputs above show it cannot matter.
            if name != cancelling_bias:
                assert torch.allclose(p, q, atol=1e-4), name


def test_replicas_are_deterministic_and_learn(tiny) -> None:
    _, splits = tiny
    runs = [
        fit([build_tiny(splits, "efficient", s) for s in (3, 4)], task_of(splits), TINY_CONFIG, seeds=[3, 4])
        for _ in range(2)
    ]
    assert [r.history for r in runs[0]] == [r.history for r in runs[1]]
    assert runs[0][0].history != runs[0][1].history  # replicas are independent
    assert all(r.test_acc > 0.9 for r in runs[0])
    assert runs[0][0].parameters == count_parameters(build_tiny(splits, "efficient", 0))


def test_replicas_bad_input(tiny) -> None:
    _, splits = tiny
    one = build_tiny(splits, "standard", 0)
    with pytest.raises(ValueError, match="seeds must give one seed per model: 2 models, got 1 seeds"):
        fit([one, build_tiny(splits, "standard", 1)], task_of(splits), seeds=[0])
    with pytest.raises(ValueError, match=r"seeds must be distinct, got \[0, 0\]"):
        fit([one, build_tiny(splits, "standard", 1)], task_of(splits), seeds=[0, 0])
    with pytest.raises(ValueError, match=r"models\[1\] differs from models\[0\]"):
        fit([one, build_tiny(splits, "super", 1)], task_of(splits), seeds=[0, 1])
    with pytest.raises(ValueError, match="at least one replica, got none"):
        fit([], task_of(splits), seeds=[])


def test_bad_train_config() -> None:
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be one of \\('adam', 'adamw'\\), got 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"min_lr must lie in \[0, lr=0.001\], got 0.1"):
        TrainConfig(min_lr=0.1)
    with pytest.raises(ValueError, match="grad_clip must be positive or None, got 0"):
        TrainConfig(grad_clip=0)


def test_fit_refuses_mixed_seed_arguments(tiny) -> None:
    _, splits = tiny
    with pytest.raises(ValueError, match="one model takes seed=..., not seeds"):
        fit(build_tiny(splits, "standard", 0), task_of(splits), TINY_CONFIG, seeds=[0])
    with pytest.raises(ValueError, match="a list of models takes seeds="):
        fit([build_tiny(splits, "standard", 0)], task_of(splits), TINY_CONFIG, seed=0)


def test_learning_rate_schedule_by_hand() -> None:
    config = TrainConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr=1e-4, decay_steps=14)
    # warm-up: lr * (step + 1) / 4
    assert [learning_rate(config, s, 100) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # cosine from 1e-3 at step 4 to 1e-4 at step 14: halfway (step 9) is the mean, 5.5e-4
    assert learning_rate(config, 9, 100) == pytest.approx(5.5e-4)
    assert learning_rate(config, 14, 100) == pytest.approx(1e-4)
    assert learning_rate(config, 50, 100) == 1e-4
    assert learning_rate(TrainConfig(lr=3e-3), 77, 100) == 3e-3


class _CountingLM(torch.nn.Module):
    """A bigram model: logits of the next token from the current one."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)  # (B, T, V)


def test_language_modeling_task_learns_a_cycle_and_selects_on_loss() -> None:
    stream = torch.arange(3000) % 7  # 0 1 2 ... 6 0 1 ...: the next token is determined
    task = LanguageModeling(stream[:2500], stream[2500:], block_size=8, steps_per_round=20, val_blocks=10)
    x, y = task.batch("train", torch.tensor([[0, 5], [3, 9]]))  # (R, B) offsets
    assert x.shape == (2, 2, 8) and torch.equal(y, (x + 1) % 7)
    torch.manual_seed(0)
    model = _CountingLM(7)
    config = TrainConfig(epochs=3, batch_size=4, optimizer="adamw", lr=0.1, weight_decay=0.1, warmup_steps=5,
                         schedule="cosine", min_lr=0.01, grad_clip=1.0, progress=False, num_threads=1)
    result = fit(model, task, config, seed=0)
    losses = [h["val_loss"] for h in result.history]
    assert "val_acc" not in result.history[0] and "train_acc" not in result.history[0]
    assert losses[-1] < losses[0] < 2.0  # ln 7 = 1.95 at the start
    assert result.best_epoch == 1 + losses.index(min(losses))
    # test is the whole validation stream in non-overlapping windows: (500 - 8) // 8 + 1 = 62
    assert len(task.splits["test"][1]) == 62 and result.test_loss == pytest.approx(min(losses), abs=0.05)


def test_classification_task_counts_argmax_hits() -> None:
    task = Classification((torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])), (torch.zeros(3, 2), torch.tensor([1, 1, 0])))
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0]))  # always predicts class 1
    (loss,), (acc,) = evaluate(model, task, "val")
    assert acc == pytest.approx(2 / 3)
    # cross-entropy of logits (0, 1): -log softmax = log(1 + e) - 1 for class 1, log(1 + e) for class 0
    import math

    assert loss == pytest.approx((2 * (math.log(1 + math.e) - 1) + math.log(1 + math.e)) / 3)


# ------------------------------------------------------------------------------- grid and CLI
SMALL = ImdbSettings(protocol="paper", epochs=2, batch_size=32)


class Interrupted(Exception):
    pass


def test_grid_resumes_after_interruption(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "grid.json"

    def kill_after_first(run: dict) -> None:
        raise Interrupted  # as if the process died right after saving its first run

    with pytest.raises(Interrupted):
        run_grid(out, variants=["standard", "super"], seeds=[0, 1], settings=SMALL, data_dir=str(data_dir), on_run=kill_after_first)
    saved = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("standard", 0)]
    assert not list(tmp_path.glob("*.tmp"))

    ran: list[tuple[str, int]] = []
    final = run_grid(
        out, variants=["standard", "super"], seeds=[0, 1], settings=SMALL, data_dir=str(data_dir),
        on_run=lambda r: ran.append((r["variant"], r["seed"])),
    )
    assert ran == [("standard", 1), ("super", 0), ("super", 1)]  # the first run is not redone
    assert [(r["variant"], r["seed"]) for r in final["runs"]] == [("standard", 0), ("standard", 1), ("super", 0), ("super", 1)]
    assert final["runs"][0] == saved["runs"][0]


def test_grid_refuses_other_settings(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "grid.json"
    run_grid(out, variants=["efficient"], seeds=[0], settings=SMALL, data_dir=str(data_dir))
    with pytest.raises(ValueError, match=r"holds runs made with other settings.*'epochs': \(2, 3\)"):
        run_grid(out, variants=["efficient"], seeds=[0], settings=ImdbSettings(protocol="paper", epochs=3, batch_size=32), data_dir=str(data_dir))
    out.write_text("{ half written")
    with pytest.raises(ValueError, match="is not a results file"):
        run_grid(out, variants=["efficient"], seeds=[0], settings=SMALL, data_dir=str(data_dir))


def test_parallel_workers_give_the_same_numbers(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    serial = run_grid(tmp_path / "a.json", variants=["optimised"], seeds=[0, 1], settings=SMALL, data_dir=str(data_dir))
    parallel = run_grid(tmp_path / "b.json", variants=["optimised"], seeds=[0, 1], settings=SMALL, data_dir=str(data_dir), workers=2)
    strip = lambda runs: [{k: v for k, v in r.items() if "seconds" not in k} for r in runs]
    assert strip(serial["runs"]) == strip(parallel["runs"])


def test_grid_with_stacked_seeds_resumes_by_whole_stacks(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    settings = ImdbSettings(protocol="paper", epochs=2, batch_size=32, stack_seeds=True)
    out = tmp_path / "stacked.json"

    def kill_after_first(run: dict) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        run_grid(out, variants=["standard", "super"], seeds=[0, 1], settings=settings, data_dir=str(data_dir), on_run=kill_after_first)
    saved = json.loads(out.read_text())
    assert [(r["variant"], r["seed"], r["stack"]) for r in saved["runs"]] == [("standard", 0, [0, 1]), ("standard", 1, [0, 1])]

    resumed = run_grid(out, variants=["standard", "super"], seeds=[0, 1], settings=settings, data_dir=str(data_dir), workers=2)
    whole = run_grid(tmp_path / "whole.json", variants=["standard", "super"], seeds=[0, 1], settings=settings, data_dir=str(data_dir))
    strip = lambda runs: [{k: v for k, v in r.items() if "seconds" not in k} for r in runs]
    assert strip(resumed["runs"]) == strip(whole["runs"])  # resuming and workers change nothing
    assert resumed["runs"][:2] == saved["runs"]


def test_grid_reads_files_written_before_a_setting_existed(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "old.json"
    first = run_grid(out, variants=["efficient"], seeds=[0], settings=SMALL, data_dir=str(data_dir))
    del first["settings"]["stack_seeds"]  # as written before the setting was added
    out.write_text(json.dumps(first))
    again = run_grid(out, variants=["efficient"], seeds=[0, 1], settings=SMALL, data_dir=str(data_dir))
    assert [r["seed"] for r in again["runs"]] == [0, 1] and again["runs"][0] == first["runs"][0]
    with pytest.raises(ValueError, match=r"'stack_seeds': \(False, True\)"):
        run_grid(out, variants=["efficient"], seeds=[0], settings=dataclasses.replace(SMALL, stack_seeds=True), data_dir=str(data_dir))


def test_cli_tiny_config(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    data_dir, _ = tiny
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "res" / "tiny.json"
    argv = ["imdb", "--protocol", "paper", "--variants", "standard", "efficient", "--seeds", "2", "--epochs", "1",
            "--quirks", "reference", "--wa-bias", "false", "--data-dir", str(data_dir), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "efficient" in printed and "p vs standard" in printed
    payload = json.loads(out.read_text())
    assert payload["settings"]["softmax_over"] == "queries" and payload["settings"]["wa_bias"] is False
    assert payload["command"].startswith("python -m pba.experiments imdb --protocol paper")
    assert {r["variant"] for r in payload["summary"]} == {"standard", "efficient"}
    assert payload["environment"]["torch"] == torch.__version__
    assert (out.parent / "tiny.png").stat().st_size > 0 and (out.parent / "tiny.svg").exists()


def test_gpt_replicas_with_decay_and_clipping_train_as_lone_runs_would() -> None:
    """Stacked replicas of the language model (AdamW, weight decay on matrices only, clipping per
    replica) follow the lone runs with the same seeds, and a stack of one works too."""
    from pba.models import GPT, GPTConfig

    stream = torch.randint(0, 11, (4000,), generator=torch.Generator().manual_seed(0))
    task = LanguageModeling(stream[:3500], stream[3500:], block_size=8, steps_per_round=6, val_blocks=8)
    config = TrainConfig(epochs=2, batch_size=4, optimizer="adamw", lr=3e-2, weight_decay=0.1, grad_clip=0.05,
                         warmup_steps=2, schedule="cosine", progress=False, num_threads=1)

    def build(seed: int) -> GPT:
        seed_everything(seed)
        return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, variant="super"))

    alone = [fit(build(s), task, config, seed=s) for s in (0, 1)]
    together = fit([build(0), build(1)], task, config, seeds=[0, 1])
    for a, b in zip(alone, together):
        assert [h["val_loss"] for h in b.history] == pytest.approx([h["val_loss"] for h in a.history], rel=1e-5)
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-5)
    (single,) = fit([build(0)], task, config, seeds=[0])
    assert [h["train_loss"] for h in single.history] == pytest.approx([h["train_loss"] for h in alone[0].history], rel=1e-5)
