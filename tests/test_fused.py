"""pba.fused: the hand-written training step against autograd through the PyTorch model, and its API."""

from __future__ import annotations

import copy
import itertools
import os
import shutil
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pba
from pba.data import prepare_imdb
from pba.models import IMDBClassifier
from pba.train import BinaryClassification, TrainConfig, evaluate, fit

from .synthetic import write_imdb_like


@pytest.fixture(scope="module", autouse=True)
def extension() -> None:
    """Compile the C++ step once. Skip, saying why, only where there is no toolchain; a build
    error fails."""
    from torch.utils.cpp_extension import is_ninja_available

    from pba.fused import load_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or not is_ninja_available():
        pytest.skip(f"no C++ toolchain to build pba.fused ({compiler} and ninja are needed)")
    load_extension()


from pba.fused import (  # noqa: E402
    PARAMETER_SLOTS,
    FusedAdam,
    FusedEngine,
    FusedIMDBStep,
    fused_unsupported_reason,
    imdb_parts,
    load_extension,
)


class FixedScale(nn.Module):
    """Dropout replaced by the scales the fused step drew, so that autograd sees the same masks."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view_as(x)


def batch(length: int, vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (5, length))
    ids[0, length // 2 :] = 0  # a padded tail
    ids[1, :] = 0  # a review of padding only: no key to read, nothing to pool
    ids[2, 0] = 0
    return ids, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])


def assert_same_step(model: IMDBClassifier, length: int) -> None:
    reference = copy.deepcopy(model)
    ids, labels = batch(length)
    fused = FusedIMDBStep(model, seed=3)
    loss, logits, *scales = fused.step(ids, labels, return_masks=True)
    block = reference.blocks[0]
    block.dropout1, block.dropout2 = FixedScale(scales[0]), FixedScale(scales[1])
    reference.head[0], reference.head[3] = FixedScale(scales[2]), FixedScale(scales[3])
    expected_logits = reference(ids)
    expected_loss = F.binary_cross_entropy_with_logits(expected_logits, labels)
    expected_loss.backward()
    torch.testing.assert_close(logits, expected_logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# length 10: lanes of eight, then single columns; 16: whole lanes (length and head width multiples of 8)
@pytest.mark.parametrize("length", [10, 16])
@pytest.mark.parametrize(
    "softmax_over, padding_mask, masked_pooling", list(itertools.product(("keys", "queries"), (True, False), (True, False)))
)
@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_loss_logits_and_every_gradient_match_autograd(
    variant: str, softmax_over: str, padding_mask: bool, masked_pooling: bool, length: int
) -> None:
    options = {"wa_bias": softmax_over == "queries"} if variant == "super" else {}
    model = IMDBClassifier(
        variant, vocab_size=50, context_length=16, softmax_over=softmax_over, padding_mask=padding_mask,
        masked_pooling=masked_pooling, **options,
    )
    assert_same_step(model, length)


def test_head_widths_other_than_eight() -> None:
    for n_heads in (1, 2, 8):  # d_k = 32, 16, 4 (4: narrower than a lane of eight)
        assert_same_step(IMDBClassifier("standard", vocab_size=50, context_length=16, n_heads=n_heads), 16)


def test_consecutive_steps_leave_no_stale_embedding_gradient() -> None:
    model = IMDBClassifier("efficient", vocab_size=50, context_length=16).eval()  # eval: no dropout
    reference = copy.deepcopy(model)
    fused = FusedIMDBStep(model, seed=0)
    first, second = batch(16), batch(16)
    fused.step(*first)
    fused.step(*second)  # rows of the first batch only must be zero again
    F.binary_cross_entropy_with_logits(reference(second[0]), second[1]).backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7)


def test_dropout_scales_rate_and_determinism() -> None:
    model = IMDBClassifier("super", vocab_size=50, context_length=32, dropout=0.25)
    ids, labels = torch.randint(1, 50, (64, 32)), torch.randint(0, 2, (64,)).float()
    first = FusedIMDBStep(model, seed=7).step(ids, labels, return_masks=True)[2]
    again = FusedIMDBStep(model, seed=7).step(ids, labels, return_masks=True)[2]
    other_seed = FusedIMDBStep(model, seed=8).step(ids, labels, return_masks=True)[2]
    fused = FusedIMDBStep(model, seed=7)
    fused.step(ids, labels)
    next_step = fused.step(ids, labels, return_masks=True)[2]
    torch.testing.assert_close(first.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((first == 0).float().mean().item() - 0.25) < 0.01  # 65,536 draws
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, next_step)
    model.eval()
    assert all(torch.all(s == 1) for s in FusedIMDBStep(model, seed=7).step(ids, labels, return_masks=True)[2:])


def test_fused_adam_is_torch_adam() -> None:
    model = IMDBClassifier("standard", vocab_size=300, context_length=16)
    reference = copy.deepcopy(model)
    fused = FusedIMDBStep(model, seed=0)
    ours, theirs = FusedAdam(fused, lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        ids = torch.randint(0, 300, (8, 16), generator=generator)
        fused._engine.last_ids = ids  # the rows this step's embedding gradient may be non-zero in
        used = torch.zeros(300, dtype=torch.bool)
        used[ids.flatten()] = True
        for mine, other in zip(model.parameters(), reference.parameters()):
            grad = torch.randn(mine.shape, generator=generator)
            if mine is model.token_embedding.weight:
                grad[~used] = 0.0
            mine.grad.copy_(grad)
            other.grad = grad.clone()
        ours.step()
        theirs.step()
        tolerance = 1e-6 if step == 0 else 1e-4  # rounding, then its growth through m / sqrt(v)
        for mine, other in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(mine.detach(), other.detach(), rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="lr must be positive, got 0"):
        FusedAdam(fused, lr=0)


def test_unsupported_models_are_refused_with_the_reason() -> None:
    assert fused_unsupported_reason(IMDBClassifier("super", vocab_size=50, context_length=16)) is None
    cases = {
        "one encoder block only, got 2": IMDBClassifier("standard", vocab_size=50, context_length=16, n_blocks=2),
        "wa_sharing='layer'": IMDBClassifier("super", vocab_size=50, context_length=16, wa_sharing="head"),
        "must be a pba.models.IMDBClassifier, got Linear": nn.Linear(2, 2),
        "must have biases": IMDBClassifier("standard", vocab_size=50, context_length=16, bias=False),
    }
    for reason, model in cases.items():
        assert reason in fused_unsupported_reason(model)
        with pytest.raises(ValueError, match="FusedIMDBStep cannot train this model"):
            FusedIMDBStep(model)
    fused = FusedIMDBStep(IMDBClassifier("standard", vocab_size=50, context_length=16))
    with pytest.raises(ValueError, match="ids must have at most context_length=16 tokens, got 17"):
        fused.step(torch.zeros(2, 17, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(3,\)"):
        fused.step(torch.zeros(2, 8, dtype=torch.long), torch.zeros(3))
    fused.model.token_embedding.weight.grad = None
    with pytest.raises(RuntimeError, match="a parameter's .grad was replaced"):
        fused.step(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny-fused")
    data_dir = write_imdb_like(root / "imdb", n_train=400, n_test=200)
    return prepare_imdb("paper", data_dir=data_dir, cache_dir=root / "cache", vocab_size=40, length=16)


def train_fused(splits, variant: str, seed: int, epochs: int) -> tuple[list[tuple[float, int]], float]:
    """``epochs`` rounds of FusedEngine (batches of 16, lr 1e-2): each round's (loss sum, correct)
    and the test accuracy."""
    torch.manual_seed(seed)
    model = IMDBClassifier(variant, vocab_size=len(splits.vocab), context_length=16, d_model=16, n_heads=2, d_ff=16)
    engine = FusedEngine(model, TrainConfig(lr=1e-2), seed=seed)
    task = BinaryClassification(splits.train, splits.val, splits.test)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        batches = task.round_batches(generator, 16)
        stats = engine.train_round(task, batches, [1e-2] * len(batches))
        history.append((stats.loss_sum.item(), stats.correct.item()))
    test_ids, test_labels = splits.test
    accuracy = ((engine.predict(test_ids)[0] > 0) == (test_labels > 0.5)).float().mean().item()
    return history, accuracy


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_the_fused_engine_learns(tiny, variant: str) -> None:
    history, accuracy = train_fused(tiny, variant, seed=0, epochs=6)
    assert accuracy > 0.9, history


def test_the_fused_engine_is_deterministic(tiny) -> None:
    a, b, c = (train_fused(tiny, "super", seed, epochs=2) for seed in (3, 3, 4))
    assert a == b
    assert a != c


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_evaluation_logits_match_the_model(variant: str) -> None:
    model = IMDBClassifier(variant, vocab_size=50, context_length=16, softmax_over="queries", padding_mask=False)
    ids, _ = batch(16)
    ids = torch.cat([ids] * 120)  # 600 reviews: several chunks of 256
    fused = FusedIMDBStep(model)
    torch.testing.assert_close(fused.logits(ids), model.eval()(ids).detach(), rtol=1e-5, atol=1e-6)
    assert model.blocks[0].dropout1.p == 0.1  # evaluation did not touch the model's settings


def test_train_epoch_is_the_python_loop_in_one_call() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (200, 16), generator=generator)
    labels = torch.randint(0, 2, (200,), generator=generator).float()
    order = torch.randperm(200, generator=generator)
    models = [IMDBClassifier("super", vocab_size=60, context_length=16, wa_bias=True) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    engines = [FusedIMDBStep(model, seed=5) for model in models]
    optimizers = [FusedAdam(engine, lr=1e-2) for engine in engines]
    loss_sum, correct = 0.0, 0
    for begin in range(0, 200, 32):  # the loop of pba.train.fit, step by step
        batch = order[begin : begin + 32]
        loss, logits = engines[0].step(ids[batch], labels[batch])
        optimizers[0].step()
        loss_sum += loss.double().item() * len(batch)
        correct += int(((logits > 0.5) == (labels[batch] > 0.5)).sum())
    got = engines[1].train_epoch(ids, labels, order, 32, optimizers[1], threshold=0.5)
    assert got == (loss_sum, correct)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert engines[1].steps_taken == optimizers[1].steps_taken == 7
    with pytest.raises(ValueError, match="optimizer must be a FusedAdam over this FusedIMDBStep"):
        engines[1].train_epoch(ids, labels, order, 32, optimizers[0])


def test_fused_engine_round_is_train_epoch() -> None:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (200, 16), generator=generator)
    labels = torch.randint(0, 2, (200,), generator=generator).float()
    order = torch.randperm(200, generator=generator)
    models = [IMDBClassifier("standard", vocab_size=60, context_length=16) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    step = FusedIMDBStep(models[0], seed=2)
    expected = step.train_epoch(ids, labels, order, 32, FusedAdam(step, lr=1e-2), threshold=0.5)
    task = BinaryClassification((ids, labels), (ids[:8], labels[:8]), threshold=0.5)
    engine = FusedEngine(models[1], TrainConfig(lr=1e-2), seed=2)
    models[1].eval()  # train_round trains in training mode whatever the model's mode
    stats = engine.train_round(task, list(order.split(32)), [1e-2] * 7)
    assert (stats.loss_sum.item(), stats.correct.item(), stats.terms, stats.examples) == (*expected, 200, 200)
    assert models[1].training
    other_rate = FusedEngine(models[2], TrainConfig(lr=5e-2), seed=2)  # the per-step rates are the ones used
    stats = other_rate.train_round(task, list(order.split(32)), [1e-2] * 7)
    assert (stats.loss_sum.item(), stats.correct.item()) == expected
    for a, b, c in zip(*(model.parameters() for model in models)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(engine.predict(ids)[0], step.logits(ids))
    with pytest.raises(ValueError, match=r"lrs must have one rate per batch \(7\), got 2"):
        engine.train_round(task, list(order.split(32)), [1e-2, 1e-2])
    with pytest.raises(ValueError, match="one encoder block only, got 2"):
        FusedEngine(IMDBClassifier("standard", vocab_size=60, context_length=16, n_blocks=2), TrainConfig(), seed=0)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_evaluation_is_the_training_forward_without_dropout(variant: str) -> None:
    options = {"wa_bias": True} if variant == "super" else {}
    model = IMDBClassifier(variant, vocab_size=50, context_length=16, **options)
    ids, labels = batch(16)
    fused = FusedIMDBStep(model, seed=4)
    model.eval()  # a training step without dropout: the same forward as evaluation, then a backward
    _, logits = fused.step(ids, labels)
    assert torch.equal(fused.logits(ids), logits)


def test_parts_are_found_by_name() -> None:
    assert sorted(PARAMETER_SLOTS.values()) == sorted(load_extension().parameter_names())
    model = IMDBClassifier("super", vocab_size=50, context_length=16, wa_bias=True)
    parts = imdb_parts(model)
    attention = model.blocks[0].attention
    assert parts["wq"] is attention.q_proj.weight and parts["wa_bias"] is attention.wa_bias
    assert parts["fc2_weight"] is model.blocks[0].ffn[2].weight and parts["head2_bias"] is model.head[4].bias
    assert "wk" not in parts and "wv" not in parts  # super attention learns neither (attention.learns_*)
    assert set(imdb_parts(IMDBClassifier("standard", vocab_size=50, context_length=16))) == (
        set(PARAMETER_SLOTS.values()) - {"wa", "wa_bias"}
    )


def test_a_model_whose_parts_have_other_names_is_refused_with_the_name() -> None:
    renamed = IMDBClassifier("standard", vocab_size=50, context_length=16)
    renamed.head = nn.Sequential(  # the same layers under other names
        OrderedDict(
            drop1=nn.Dropout(0.1), fc1=nn.Linear(32, 6), relu=nn.ReLU(), drop2=nn.Dropout(0.1), fc2=nn.Linear(6, 1)
        )
    )
    other_ffn = IMDBClassifier("standard", vocab_size=50, context_length=16)
    other_ffn.blocks[0].ffn = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    extra = IMDBClassifier("standard", vocab_size=50, context_length=16)
    extra.scale = nn.Parameter(torch.ones(1))
    cases = {
        "the model has no module 'head.0'": renamed,
        "the model's 'blocks.0.ffn.1' must be a ReLU, got GELU": other_ffn,
        r"the fused step does not know the model's parameter\(s\) \['scale'\]": extra,
    }
    for reason, model in cases.items():
        with pytest.raises(ValueError, match=reason):
            imdb_parts(model)
        with pytest.raises(ValueError, match="FusedIMDBStep cannot train this model: " + reason):
            FusedIMDBStep(model)


def test_fit_with_the_fused_engine_keeps_the_best_epoch_and_repeats(tiny) -> None:
    """pba.train.fit drives FusedEngine like any engine: same seed, same history; the kept epoch's
    weights are back in the model, and its test accuracy is what the engine's own forward gives."""
    task = BinaryClassification(tiny.train, tiny.val, tiny.test)
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-2, progress=False, num_threads=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = IMDBClassifier("super", vocab_size=len(tiny.vocab), context_length=16, d_model=16, n_heads=2, d_ff=16)
        engine = FusedEngine(model, config, seed=0)
        runs.append((fit(model, task, config, seed=0, engine=engine), model, engine))
    (first, model, engine), (again, _, _) = runs
    assert first.history == again.history and first.test_acc == again.test_acc
    assert first.val_acc == max(h["val_acc"] for h in first.history)
    (_,), (test_acc,) = evaluate(engine, task, "test")
    assert test_acc == first.test_acc
    with pytest.raises(ValueError, match="FusedEngine cannot train this model: it runs plain Adam only"):
        FusedEngine(model, TrainConfig(optimizer="adamw"), seed=0)
