"""The generation and vision experiments end to end on real data: short runs learn, runs are
deterministic per seed, the command line answers mistakes in one line, grids resume."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pba.data import load_mnist, load_shakespeare, split_mnist
from pba.experiments import mnist, shakespeare
from pba.experiments.cli import main
from pba.experiments.grid import run_grid
from pba.models.gpt import GPTArchitecture
from pba.models.vit import ViTArchitecture

TINY_GPT = shakespeare.ShakespeareSettings(
    iterations=30, eval_interval=10, val_blocks=16, n_layer=1, n_embd=32, n_head=2, warmup_steps=5
)
TINY_VIT = mnist.MnistSettings(epochs=2, train_size=1024, warmup_steps=4, d_model=32, n_layers=1)


@pytest.fixture(scope="module")
def corpus(shakespeare_dir: Path):
    return load_shakespeare(shakespeare_dir)


@pytest.fixture(scope="module")
def shakespeare_dir() -> Path:  # module scope for the corpus above
    import os

    value = os.environ.get("PBA_SHAKESPEARE_DIR")
    if not value or not (Path(value) / "input.txt").is_file():
        pytest.skip("Tiny Shakespeare not available: set PBA_SHAKESPEARE_DIR")
    return Path(value)


@pytest.fixture(scope="module")
def digits():
    import os

    value = os.environ.get("PBA_MNIST_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("MNIST not available: set PBA_MNIST_DIR")
    return split_mnist(load_mnist(value), val_size=512, train_size=TINY_VIT.train_size)


@pytest.mark.parametrize("variant", ["standard", "super"])
def test_thirty_steps_on_real_text_lower_the_loss_and_repeat_exactly(corpus, variant: str) -> None:
    torch.set_num_threads(1)
    first = shakespeare.run_one(variant, 0, corpus, TINY_GPT)
    again = shakespeare.run_one(variant, 0, corpus, TINY_GPT)
    other = shakespeare.run_one(variant, 1, corpus, TINY_GPT)
    losses = [h["val_loss"] for h in first["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] < math.log(65) + 0.3
    assert first["history"] == again["history"] and first["sample"] == again["sample"]
    assert first["history"] != other["history"]
    assert first["val_bpc"] == pytest.approx(first["test_loss"] / math.log(2))
    assert len(first["sample"]) == shakespeare.SAMPLE_CHARS
    if variant == "super":  # W^A is stored as it acts: lower-triangular, one per layer
        (wa,) = first["wa"]
        assert len(wa) == 64 and all(v == 0 for i, row in enumerate(wa) for v in row[i + 1 :])


@pytest.mark.parametrize("variant", ["efficient", "super"])
def test_a_short_run_on_real_digits_learns_and_repeats_exactly(digits, variant: str) -> None:
    torch.set_num_threads(1)
    first = mnist.run_one(variant, 0, digits, TINY_VIT)
    again = mnist.run_one(variant, 0, digits, TINY_VIT)
    assert first["history"] == again["history"] and first["test_acc"] == again["test_acc"]
    assert first["history"][-1]["train_loss"] < first["history"][0]["train_loss"] < math.log(10) + 0.2
    assert first["test_acc"] > 0.2  # twice chance (0.1) after 16 steps of 128 digits
    assert first["n_tokens"] == 16 and len(first["attention_maps"]) == 1
    assert torch.tensor(first["attention_maps"][0]).shape == (mnist.MAP_IMAGES, 16, 16)
    assert torch.tensor(first["attention_maps"][0]).sum(-1).sub(1).abs().max() < 1e-3  # rows of softmax weights
    assert ("wa" in first) == (variant == "super")


def test_macs_per_image_by_hand() -> None:
    # patch 7, 16 tokens, d 64, 2 layers, MLP ratio 2, 10 classes, efficient attention:
    # embedding 16*49*64 = 50,176; attention 2*16*64^2 + 2*16^2*64 = 163,840 per layer;
    # MLP 2*16*64*128 = 262,144 per layer; head 640
    config = mnist.MnistSettings().model("efficient").config
    assert mnist.forward_macs(config) == 50_176 + 2 * (163_840 + 262_144) + 640


def test_cli_answers_mistakes_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {
        ("mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.json")): "data_dir",
        ("shakespeare", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b.json")): "input.txt",
        ("shakespeare", "--iterations", "25", "--eval-interval", "10", "--out", str(tmp_path / "c.json")): "multiple of eval_interval",
        ("imdb", "--engine", "gpu", "--out", str(tmp_path / "d.json")): "engine must be one of",
        ("mnist", "--seeds", "0", "--out", str(tmp_path / "e.json")): "--seeds must be at least 1, got 0",
    }
    for args, expected in cases.items():
        assert main(list(args)) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m pba.experiments: error:") and expected in lines[0], lines
    with pytest.raises(FileNotFoundError):  # --debug lets the traceback through
        main(["mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.json"), "--debug"])
    done = subprocess.run(  # and as a command: exit status 2, one line
        [sys.executable, "-m", "pba.experiments", "mnist", "--seeds", "0", "--out", str(tmp_path / "f.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "python -m pba.experiments: error: --seeds must be at least 1, got 0"
    ]


def test_shakespeare_grid_resumes_and_refuses_other_settings(corpus, shakespeare_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    seen: list[tuple[str, int]] = []
    first = run_grid(shakespeare.EXPERIMENT, out, variants=["efficient"], seeds=[0], settings=TINY_GPT, data_dir=str(shakespeare_dir),
                                 on_run=lambda r: seen.append((r["variant"], r["seed"])))
    again = run_grid(shakespeare.EXPERIMENT, out, variants=["efficient"], seeds=[0, 1], settings=TINY_GPT, data_dir=str(shakespeare_dir),
                                 on_run=lambda r: seen.append((r["variant"], r["seed"])))
    assert seen == [("efficient", 0), ("efficient", 1)]  # seed 0 was read back, not rerun
    assert again["runs"][0]["history"] == first["runs"][0]["history"]
    assert json.loads(out.read_text())["experiment"] == "shakespeare"
    with pytest.raises(ValueError, match="holds runs made with other settings"):
        run_grid(shakespeare.EXPERIMENT, out, variants=["efficient"], seeds=[0], settings=dataclasses.replace(TINY_GPT, lr=2e-3),
                             data_dir=str(shakespeare_dir))
    with pytest.raises(ValueError, match="holds runs of experiment 'shakespeare', not 'mnist'"):
        run_grid(mnist.EXPERIMENT, out, variants=["efficient"], seeds=[0], settings=TINY_VIT)


# Non-default values of every architecture field, valid together.
_GPT_ARCH = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 24, "dropout": 0.1, "bias": False,
             "tie_weights": False, "wa_init": "identity"}
_VIT_ARCH = {"patch_size": 4, "d_model": 24, "n_layers": 1, "n_heads": 3, "mlp_ratio": 3, "pooling": "cls",
             "dropout": 0.1}


@pytest.mark.parametrize(
    ("settings_type", "architecture_type", "changes", "build"),
    [
        (shakespeare.ShakespeareSettings, GPTArchitecture, _GPT_ARCH, lambda s: s.model("super", 11)),
        (mnist.MnistSettings, ViTArchitecture, _VIT_ARCH, lambda s: s.model("super")),
    ],
)
def test_settings_pass_every_architecture_field_to_the_model(settings_type, architecture_type, changes, build) -> None:
    names = {f.name for f in dataclasses.fields(architecture_type)}
    assert names == set(changes)  # a field added to the architecture must be added here too
    defaults = architecture_type()
    assert all(getattr(defaults, k) != v for k, v in changes.items())
    model = build(settings_type(**changes))
    assert {k: getattr(model.config, k) for k in names} == changes
    assert model.config.variant == "super"


def test_settings_check_the_architecture_when_made() -> None:
    with pytest.raises(ValueError, match="n_embd must be divisible by n_head"):
        shakespeare.ShakespeareSettings(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        mnist.MnistSettings(pooling="max")


def test_committed_results_load_as_settings() -> None:
    """Each committed grid's settings make its experiment's settings (missing fields: defaults)."""
    root = Path(__file__).resolve().parents[1] / "results"
    for name, settings_type in (("shakespeare", shakespeare.ShakespeareSettings), ("mnist", mnist.MnistSettings)):
        recorded = json.loads((root / f"{name}.json").read_text())["settings"]
        settings = settings_type(**recorded)
        assert {k: v for k, v in dataclasses.asdict(settings).items() if k in recorded} == recorded
