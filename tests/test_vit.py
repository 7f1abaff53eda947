"""pba.models.vit (patches, the ViT with every variant) and pba.data.mnist (IDX files, the split)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pba import VARIANTS
from pba.data.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    MNISTData,
    _from_hub_split,
    load_mnist,
    read_idx,
    split_mnist,
)
from pba.models.vit import ViT, ViTConfig, patchify, unpatchify

SMALL = {"d_model": 16, "n_layers": 2, "n_heads": 4, "mlp_ratio": 2}


# ------------------------------------------------------------------------------------ patches
@pytest.mark.parametrize(("patch", "channels", "size"), [(4, 1, 28), (7, 1, 28), (2, 3, 6), (1, 2, 3)])
def test_patchify_round_trip(patch: int, channels: int, size: int) -> None:
    images = torch.randn(3, channels, size, size)
    patches = patchify(images, patch)
    assert patches.shape == (3, (size // patch) ** 2, channels * patch * patch)
    assert torch.equal(unpatchify(patches, patch, size, channels), images)


def test_patchify_order_rows_then_columns_channel_major() -> None:
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(images, 2)  # (1, 4, 8)
    # patch 1 is the top-right one: channel 0's 2x2 pixels row by row, then channel 1's
    assert patches[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert torch.equal(patches[0, 2], images[0, :, 2:, :2].reshape(-1))


def test_patchify_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"patch must divide the image size 28x28, got patch=5"):
        patchify(torch.zeros(1, 1, 28, 28), 5)
    with pytest.raises(ValueError, match=r"patch must be a positive int, got 0"):
        patchify(torch.zeros(1, 1, 28, 28), 0)
    with pytest.raises(ValueError, match=r"images must be a tensor \(batch, channels, height, width\), got \(28, 28\)"):
        patchify(torch.zeros(28, 28), 7)
    with pytest.raises(ValueError, match=r"patch must divide the image size 28x28, got patch=3"):
        unpatchify(torch.zeros(1, 16, 49), 3, 28, 1)
    with pytest.raises(ValueError, match=r"patches must have shape .*\(batch, 16, 49\).*got \(1, 49, 16\)"):
        unpatchify(torch.zeros(1, 49, 16), 7, 28, 1)


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_every_variant(variant: str, pooling: str) -> None:
    model = ViT(ViTConfig(patch_size=7, variant=variant, pooling=pooling, **SMALL))
    assert model.n_tokens == (16 if pooling == "mean" else 17)
    logits = model(torch.randn(5, 1, 28, 28))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    kinds = {type(layer).__name__.removesuffix("Attention").lower() for layer in model.attention_layers}
    assert kinds == {variant}
    assert model.blocks[1].attention is model.attention_layers[1]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize(("patch", "patches"), [(7, 16), (4, 49)])
def test_super_wa_is_tokens_by_tokens(patch: int, patches: int, pooling: str) -> None:
    model = ViT(ViTConfig(patch_size=patch, variant="super", pooling=pooling, **SMALL))
    n_tokens = patches + (pooling == "cls")
    assert model.n_tokens == model.config.n_tokens == n_tokens
    for layer in model.attention_layers:
        assert layer.context_length == n_tokens
        assert layer.wa_weight.shape == (n_tokens, n_tokens)
    maps = model.attention_weights(torch.randn(2, 1, 28, 28))
    assert [m.shape for m in maps] == [(2, 4, n_tokens, n_tokens)] * 2
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, n_tokens), atol=1e-5)


def test_cls_pooling_reads_the_class_token_and_mean_pooling_every_patch() -> None:
    for pooling in ("mean", "cls"):
        model = ViT(ViTConfig(pooling=pooling, **SMALL))
        x = torch.randn(2, model.n_tokens, 16)
        expected = x[:, 0] if pooling == "cls" else x.mean(1)
        assert torch.equal(model.pool(x), expected)
    assert ViT(ViTConfig(pooling="cls", **SMALL)).cls_token.shape == (1, 1, 16)
    assert ViT(ViTConfig(pooling="mean", **SMALL)).cls_token is None


def test_other_channels_classes_and_keyword_construction() -> None:
    model = ViT(image_size=8, patch_size=2, channels=3, n_classes=4, variant="efficient", **SMALL)
    assert model.n_tokens == 16 and model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    wa_model = ViT(ViTConfig(variant="super", attention_options={"wa_sharing": "head"}, **SMALL))
    assert wa_model.blocks[0].attention.wa_weight.shape == (4, 16, 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variant": "sparse"}, r"variant must be one of .*got 'sparse'"),
        ({"pooling": "max"}, r"pooling must be one of \('mean', 'cls'\), got 'max'"),
        ({"patch_size": 5}, r"patch_size must divide image_size=28, got patch_size=5"),
        ({"n_heads": 3}, r"d_model must be divisible by n_heads, got d_model=16, n_heads=3"),
        ({"d_model": 0}, r"d_model must be a positive int, got 0"),
        ({"n_layers": 1.5}, r"n_layers must be a positive int, got 1.5"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1.0"),
        ({"attention_options": {"context_length": 9}}, r"attention_options must not set context_length"),
    ],
)
def test_bad_config(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{**SMALL, **changes})


def test_bad_images() -> None:
    model = ViT(ViTConfig(**SMALL))
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 28, 28\), got \(2, 28, 28\)"):
        model(torch.randn(2, 28, 28))
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"images must be a floating-point tensor .*got dtype torch.uint8"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"config must be a ViTConfig, got dict"):
        ViT({"d_model": 16})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pass either config or keyword overrides"):
        ViT(ViTConfig(**SMALL), d_model=32)


# ------------------------------------------------------------------------------------ IDX files
def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool = True) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload, compresslevel=1))
    else:
        path.write_bytes(payload)
    return path


def marked_images(n: int) -> np.ndarray:
    """``n`` 28x28 images; image ``i`` carries ``i`` in its first two pixels (base 256)."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    images[:, 14, :] = 255
    return images


def write_mnist_dir(directory: Path, n_train: int = 60_000, n_test: int = 10_000, gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write(directory / f"{stem}-images-idx3-ubyte", idx_images(marked_images(n)), gz)
        write(directory / f"{stem}-labels-idx1-ubyte", idx_labels(np.arange(n) % 10), gz)
    return directory


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size MNIST-like IDX files, not gzipped (quick to write and read)."""
    return write_mnist_dir(tmp_path_factory.mktemp("mnist"))


def test_synthetic_directory_uncompressed_and_from_env(synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBA_MNIST_DIR", str(synthetic_dir))
    data = load_mnist()
    assert data.source == f"dir:{synthetic_dir.resolve()}"
    assert data.train_images.shape == (60_000, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_labels.shape == (10_000,) and data.test_labels.dtype == torch.int64
    assert data.train_labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert int(data.train_images[300, 0, 0]) + 256 * int(data.train_images[300, 0, 1]) == 300


def test_read_idx_gzipped_and_plain(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    for gz in (True, False):
        path = write(tmp_path / f"images-{gz}", idx_images(images), gz)
        assert np.array_equal(read_idx(path, images=True), images)
    labels = write(tmp_path / "labels", idx_labels(np.array([3, 1, 4])))
    assert read_idx(labels, images=False).tolist() == [3, 1, 4]


def test_wrong_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "train-images-idx3-ubyte", idx_images(marked_images(2), magic=2049))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is not an IDX images file: expected magic number 2051, got 2049"):
        read_idx(path, images=True)
    path = write(tmp_path / "labels", idx_labels(np.zeros(2), magic=2051), gz=False)
    with pytest.raises(ValueError, match=r"not an IDX labels file: expected magic number 2049, got 2051"):
        read_idx(path, images=False)


def test_truncated_files(tmp_path: Path) -> None:
    payload = idx_images(marked_images(10))
    path = write(tmp_path / "cut-images", payload[:-100])
    with pytest.raises(ValueError, match=rf"cut-images.gz is truncated: expected {16 + 7840} bytes .*got {16 + 7740}"):
        read_idx(path, images=True)
    path = write(tmp_path / "long-labels", idx_labels(np.zeros(4)) + b"\0", gz=False)
    with pytest.raises(ValueError, match=r"long-labels is longer than its header says: expected 12 bytes .*got 13"):
        read_idx(path, images=False)
    path = write(tmp_path / "header", payload[:10], gz=False)
    with pytest.raises(ValueError, match=r"header is truncated: an IDX images header needs 16 bytes, got 10"):
        read_idx(path, images=True)
    broken = tmp_path / "stream.gz"
    broken.write_bytes(gzip.compress(payload)[:-20])  # a gzip stream cut short
    with pytest.raises(ValueError, match=r"stream.gz is not a complete gzip file"):
        read_idx(broken, images=True)


def test_count_mismatch_shapes_and_labels(tmp_path: Path) -> None:
    directory = write_mnist_dir(tmp_path / "mismatch", n_train=30, n_test=20, gz=True)
    write(directory / "train-labels-idx1-ubyte", idx_labels(np.zeros(29)))
    with pytest.raises(ValueError, match=r"train images and labels must have the same count, got 30 images and 29 labels"):
        load_mnist(directory)
    write(directory / "train-labels-idx1-ubyte", idx_labels(np.zeros(30)))
    with pytest.raises(ValueError, match=r"expected 60000 train images, got 30"):
        load_mnist(directory)
    write(directory / "train-images-idx3-ubyte", idx_images(np.zeros((30, 32, 32))))
    with pytest.raises(ValueError, match=r"train images must be 28x28, got 32x32"):
        load_mnist(directory)
    write(directory / "train-images-idx3-ubyte", idx_images(marked_images(30)))
    write(directory / "train-labels-idx1-ubyte", idx_labels(np.full(30, 11)))
    with pytest.raises(ValueError, match=r"train labels must be in 0..9, found \[11\]"):
        load_mnist(directory)


def test_missing_file_directory_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_mnist_dir(tmp_path / "three", n_train=3, n_test=3, gz=True)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_dir .* has no t10k-labels-idx1-ubyte.gz \(or t10k-labels-idx1-ubyte\)"):
        load_mnist(directory)
    with pytest.raises(FileNotFoundError, match=r"data_dir must be a directory holding the four MNIST IDX files, got .*nowhere"):
        load_mnist(tmp_path / "nowhere")
    monkeypatch.delenv("PBA_MNIST_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"pass data_dir \(or set PBA_MNIST_DIR\)"):
        load_mnist()


def test_hub_conversion_on_a_tiny_dataset() -> None:
    datasets = pytest.importorskip("datasets")
    pil = pytest.importorskip("PIL.Image")
    images = marked_images(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    dataset = datasets.Dataset.from_dict(
        {"image": [pil.fromarray(image) for image in images], "label": [7, 0, 9]}, features=features
    )
    got_images, got_labels = _from_hub_split(dataset)
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [7, 0, 9]
    with pytest.raises(ValueError, match=r"dataset must have columns 'image' and 'label', got \['label'\]"):
        _from_hub_split(dataset.remove_columns("image"))


# ------------------------------------------------------------------------------------ the split
@pytest.fixture(scope="module")
def synthetic_data() -> MNISTData:
    train = torch.from_numpy(marked_images(60_000))
    return MNISTData(train, torch.arange(60_000) % 10, train[:10_000].clone(), torch.arange(10_000) % 10, "synthetic")


def index_of(images: torch.Tensor) -> torch.Tensor:
    """The index each synthetic image carries, read back from normalised pixels."""
    pixels = (images[:, 0, 0, :2] * MNIST_STD + MNIST_MEAN) * 255
    return (pixels[:, 0].round() + 256 * pixels[:, 1].round()).long()


def test_split_sizes_disjoint_normalised_and_deterministic(synthetic_data: MNISTData) -> None:
    splits = split_mnist(synthetic_data, val_size=5_000, split_seed=3)
    assert splits.sizes() == {"train": 55_000, "val": 5_000, "test": 10_000}
    (x_train, y_train), (x_val, y_val) = splits.train, splits.val
    assert x_train.shape == (55_000, 1, 28, 28) and x_train.dtype == torch.float32
    assert y_val.dtype == torch.int64
    train, val = set(splits.train_indices.tolist()), set(splits.val_indices.tolist())
    assert not train & val and len(train | val) == 60_000
    assert torch.equal(index_of(x_val), splits.val_indices)  # images and labels follow the indices
    assert torch.equal(y_train, splits.train_indices % 10)
    assert torch.allclose(x_val[:, 0, 14], torch.full((5_000, 28), (1 - MNIST_MEAN) / MNIST_STD))
    assert torch.allclose(x_val[:, 0, 5], torch.full((5_000, 28), -MNIST_MEAN / MNIST_STD))
    again = split_mnist(synthetic_data, val_size=5_000, split_seed=3)
    assert torch.equal(again.val_indices, splits.val_indices) and torch.equal(again.train[0], x_train)
    other = split_mnist(synthetic_data, val_size=5_000, split_seed=4)
    assert not torch.equal(other.val_indices, splits.val_indices)


def test_split_train_subset_nests_and_bad_arguments(synthetic_data: MNISTData) -> None:
    small = split_mnist(synthetic_data, val_size=1_000, train_size=2_000)
    large = split_mnist(synthetic_data, val_size=1_000, train_size=8_000)
    assert small.sizes()["train"] == 2_000 and torch.equal(small.val_indices, large.val_indices)
    assert set(small.train_indices.tolist()) <= set(large.train_indices.tolist())
    with pytest.raises(ValueError, match=r"val_size must be an int in 1..59999, got 60000"):
        split_mnist(synthetic_data, val_size=60_000)
    with pytest.raises(ValueError, match=r"train_size must be None or an int in 1..59000 .*got 59001"):
        split_mnist(synthetic_data, val_size=1_000, train_size=59_001)
    with pytest.raises(ValueError, match=r"split_seed must be an int, got 1.5"):
        split_mnist(synthetic_data, split_seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"data must be an MNISTData"):
        split_mnist((synthetic_data.train_images, synthetic_data.train_labels))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def real_mnist() -> MNISTData:
    value = os.environ.get("PBA_MNIST_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("real MNIST not available: set PBA_MNIST_DIR to a directory of the four IDX files")
    return load_mnist(value)


def test_real_mnist(real_mnist: MNISTData) -> None:
    data = real_mnist
    assert data.train_images.shape == (60_000, 28, 28) and data.test_images.shape == (10_000, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_labels[:5].tolist() == [5, 0, 4, 1, 9] and data.test_labels[:3].tolist() == [7, 2, 1]
    assert data.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert data.test_labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = data.train_images.double().mean().item() / 255
    assert abs(mean - MNIST_MEAN) < 5e-5
    assert data.source.startswith("dir:")
