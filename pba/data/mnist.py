"""MNIST: loading (a local directory of the original IDX files, or the Hub) and the split protocol.

Data flow: :func:`load_mnist` (uint8 images and int64 labels of the official 60,000 / 10,000
splits) -> :func:`split_mnist` (a seeded random validation split carved from the training images,
float tensors ``(N, 1, 28, 28)`` normalised with the training set's mean and standard deviation).

Offline, ``data_dir`` (or the environment variable ``PBA_MNIST_DIR``) names a directory holding
the four original files under their original names, gzipped or not::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

The IDX format: a big-endian header (magic number 2051 for images, 2049 for labels, the item
count, and for images the numbers of rows and columns), then one unsigned byte per pixel (row-major)
or per label. Everything read is checked: magic numbers, counts, sizes, label range.

Online (no directory, and neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` set) the same data
comes from the Hub's ``ylecun/mnist`` through ``datasets``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._common import offline

__all__ = [
    "MNIST_DIR_ENV",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNISTData",
    "MNISTSplits",
    "load_mnist",
    "split_mnist",
    "normalise",
    "read_idx",
]

#: environment variable naming a local directory of the four IDX files
MNIST_DIR_ENV = "PBA_MNIST_DIR"
HUB_DATASET = "ylecun/mnist"

#: pixel mean and standard deviation of the 60,000 training images, on the scale 0..1
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IMAGE_SIDE = 28
N_CLASSES = 10
#: file stem of (images, labels) and the number of items, per split
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}


@dataclass(frozen=True)
class MNISTData:
    """The official splits: images ``(N, 28, 28)`` uint8 (0..255), labels ``(N,)`` int64 (0..9)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str


# ----------------------------------------------------------------------------------- IDX files
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, or a cut-off gzip stream
        raise ValueError(f"{path} is not a complete gzip file: {error}") from error


def read_idx(path: str | os.PathLike[str], *, images: bool) -> np.ndarray:
    """Read one IDX file of unsigned bytes: images ``(N, rows, cols)`` or labels ``(N,)``, uint8.

    Raises a ``ValueError`` naming the file when the magic number is not the one expected (2051 for
    ``images=True``, 2049 for labels), or when the file is shorter or longer than its header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    kind, magic, header = ("images", IMAGES_MAGIC, 16) if images else ("labels", LABELS_MAGIC, 8)
    if len(raw) < header:
        raise ValueError(
            f"{path} is truncated: an IDX {kind} header needs {header} bytes, got {len(raw)}"
        )
    got_magic, count = struct.unpack(">II", raw[:8])
    if got_magic != magic:
        raise ValueError(
            f"{path} is not an IDX {kind} file: expected magic number {magic}, got {got_magic}"
        )
    shape: tuple[int, ...] = (count,)
    if images:
        rows, cols = struct.unpack(">II", raw[8:16])
        shape = (count, rows, cols)
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {problem}: expected {expected} bytes for {kind} of shape {shape}, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"data_dir {directory} has no {stem}.gz (or {stem}); expected the four original MNIST files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, gzipped or not"
    )


def _check_split(split: str, images: np.ndarray, labels: np.ndarray, where: str) -> tuple[Tensor, Tensor]:
    """Counts, shapes and label range of one split; uint8 images and int64 labels as tensors."""
    expected = SPLIT_FILES[split][2]
    if len(images) != len(labels):
        raise ValueError(
            f"{where}: the {split} images and labels must have the same count, got "
            f"{len(images)} images and {len(labels)} labels"
        )
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{where}: {split} images must be {IMAGE_SIDE}x{IMAGE_SIDE}, got "
            f"{'x'.join(map(str, images.shape[1:]))}"
        )
    if labels.size and labels.max() >= N_CLASSES:
        bad = sorted(set(labels[labels >= N_CLASSES].tolist()))[:5]
        raise ValueError(f"{where}: {split} labels must be in 0..9, found {bad}")
    if len(images) != expected:
        raise ValueError(f"{where}: expected {expected} {split} images, got {len(images)}")
    return (
        torch.from_numpy(np.array(images, dtype=np.uint8)),  # a writable copy
        torch.from_numpy(labels.astype(np.int64)),
    )


def _load_directory(directory: Path) -> MNISTData:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data_dir must be a directory holding the four MNIST IDX files, got {directory}"
        )
    paths = {  # every file is found before any is read, so a missing one fails at once
        split: (_find(directory, images_stem), _find(directory, labels_stem))
        for split, (images_stem, labels_stem, _) in SPLIT_FILES.items()
    }
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    for split, (images_path, labels_path) in paths.items():
        images = read_idx(images_path, images=True)
        labels = read_idx(labels_path, images=False)
        tensors[split] = _check_split(split, images, labels, f"{images_path} and {labels_path.name}")
    return MNISTData(*tensors["train"], *tensors["test"], source=f"dir:{directory.resolve()}")


# ----------------------------------------------------------------------------------- the Hub
def _from_hub_split(dataset: object) -> tuple[np.ndarray, np.ndarray]:
    """A ``datasets.Dataset`` with columns ``image`` (PIL, 28x28 grey) and ``label`` -> arrays."""
    columns = getattr(dataset, "column_names", None)
    if columns is None or not {"image", "label"} <= set(columns):
        raise ValueError(f"dataset must have columns 'image' and 'label', got {columns}")
    images = [np.asarray(image.convert("L"), dtype=np.uint8) for image in dataset["image"]]
    labels = np.asarray(list(dataset["label"]), dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be in 0..9, found {int(labels.min())}")
    if not images:
        return np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8), labels
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise ValueError(f"images must all have one size, got sizes {sorted(shapes)[:5]}")
    return np.stack(images), labels


def _load_hub() -> MNISTData:
    from datasets import load_dataset

    dataset = load_dataset(HUB_DATASET)
    where = f"hub:{HUB_DATASET}"
    tensors = {split: _check_split(split, *_from_hub_split(dataset[split]), where) for split in SPLIT_FILES}
    return MNISTData(*tensors["train"], *tensors["test"], source=where)


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> MNISTData:
    """Load MNIST's 60,000 training and 10,000 test images with their labels.

    Args:
        data_dir: a directory holding the four original IDX files (gzipped or not). Defaults to the
            environment variable ``PBA_MNIST_DIR``; when neither is set the Hub's ``ylecun/mnist``
            is used, unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set, which fails at once.
    """
    if data_dir is None and os.environ.get(MNIST_DIR_ENV):
        data_dir = os.environ[MNIST_DIR_ENV]
    if data_dir is not None:
        return _load_directory(Path(data_dir).expanduser())
    if offline():
        raise RuntimeError(
            "MNIST is not available offline: either pass data_dir (or set "
            f"{MNIST_DIR_ENV}) to a directory holding the four original IDX files "
            "(train-images-idx3-ubyte.gz, ...), or go online and unset "
            f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE to download {HUB_DATASET} from the Hub"
        )
    return _load_hub()


# ----------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class MNISTSplits:
    """Float images ``(N, 1, 28, 28)``, ``(x / 255 - MNIST_MEAN) / MNIST_STD``, and int64 labels.

    ``train_indices`` and ``val_indices`` index the official 60,000 training images (sorted).
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    train_indices: Tensor
    val_indices: Tensor
    settings: dict

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)[1]) for name in ("train", "val", "test")}


def normalise(images: Tensor) -> Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)``, ``(x / 255 - 0.1307) / 0.3081``."""
    return ((images.to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def split_mnist(
    data: MNISTData,
    *,
    val_size: int = 5_000,
    split_seed: int = 0,
    train_size: int | None = None,
) -> MNISTSplits:
    """Carve a random validation split from the 60,000 training images; normalise every split.

    Args:
        data: from :func:`load_mnist`.
        val_size: images held out for validation (chosen by a ``torch.Generator`` seeded with
            ``split_seed``); the rest train. The official 10,000 test images are the test split.
        split_seed: seed of the split; the same seed always gives the same split.
        train_size: keep only this many training images (the first of the same random order, so a
            smaller subset is contained in a larger one); ``None`` keeps all the rest.
    """
    if not isinstance(data, MNISTData):
        raise TypeError(f"data must be an MNISTData (from load_mnist), got {type(data).__name__}")
    n = len(data.train_labels)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int in 1..{n - 1}, got {val_size!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"split_seed must be an int, got {split_seed!r}")
    room = n - val_size
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or not 0 < train_size <= room
    ):
        raise ValueError(f"train_size must be None or an int in 1..{room} (60,000 - val_size), got {train_size!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx = order[:val_size].sort().values
    train_idx = order[val_size:] if train_size is None else order[val_size : val_size + train_size]
    train_idx = train_idx.sort().values
    settings = {
        "val_size": val_size,
        "split_seed": split_seed,
        "train_size": train_size,
        "normalisation": f"(x / 255 - {MNIST_MEAN}) / {MNIST_STD}",
        "source": data.source,
    }
    return MNISTSplits(
        train=(normalise(data.train_images[train_idx]), data.train_labels[train_idx]),
        val=(normalise(data.train_images[val_idx]), data.train_labels[val_idx]),
        test=(normalise(data.test_images), data.test_labels.clone()),
        train_indices=train_idx,
        val_indices=val_idx,
        settings=settings,
    )
