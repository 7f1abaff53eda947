"""IMDB reviews: loading (Hub or a local Parquet directory), tokenising, and the two protocols.

Data flow: :func:`load_imdb` (raw texts and labels) -> :class:`Tokenizer` -> :func:`prepare_imdb`
(fixed-length token-id tensors per split, cached on disk keyed by every setting).

Two protocols (see the book's IMDB chapter):

``seed``
    The PyTorch reference reimplementation: the 50,000 labelled reviews pooled and split at random
    40,000 / 4,000 / 6,000; ``<SOS>`` followed by the *first* 31 words; padding at the end.
``paper``
    The Keras example the authors built on: the official 25,000 / 25,000 split, the last 10 % of the
    training split as validation, sequences padded and truncated at the *front* (the *last* 32
    tokens are kept), vocabulary of 20,000.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..files import write_atomic
from ._common import CACHE_DIR_ENV
from ._common import cache_dir as _cache_dir
from ._common import offline as _offline

__all__ = [
    "IMDB_DIR_ENV",
    "CACHE_DIR_ENV",
    "IMDBText",
    "TokenizerConfig",
    "Tokenizer",
    "EncodedSplits",
    "PROTOCOLS",
    "load_imdb",
    "prepare_imdb",
    "clean_text",
]

#: environment variable naming a local directory of the Hub's Parquet files
IMDB_DIR_ENV = "PBA_IMDB_DIR"
HUB_DATASET = "stanfordnlp/imdb"

PAD, UNK, SOS = "<PAD>", "<UNK>", "<SOS>"

_BREAK = re.compile(r"<br\s*/?>")
_NOT_KEPT = re.compile(r"[^a-z0-9\s]")


def clean_text(text: str) -> str:
    """Lowercase, turn ``<br />`` into a space, keep only ``[a-z0-9]`` and white space."""
    return _NOT_KEPT.sub("", _BREAK.sub(" ", text.lower())).strip()


@dataclass(frozen=True)
class IMDBText:
    """The labelled reviews: the official ``train`` and ``test`` splits, 25,000 each."""

    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    source: str

    def fingerprint(self) -> str:
        """A hash of every text and label, so a cache never outlives its data."""
        digest = hashlib.sha256()
        for texts, labels in ((self.train_texts, self.train_labels), (self.test_texts, self.test_labels)):
            digest.update("\n".join(texts).encode())
            digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------- loading
def _check_parquet(path: Path) -> None:
    """Columns ``text`` (non-empty strings) and ``label`` (0 or 1), or a ValueError naming the file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{path} is not a readable Parquet file: {error}") from error
    missing = {"text", "label"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{path} must have columns 'text' and 'label', missing {sorted(missing)} "
            f"(found {table.column_names})"
        )
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if table.num_rows == 0:
        raise ValueError(f"{path} holds no rows")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"{path}: labels must be 0 or 1, found {sorted(set(labels[bad].tolist()))[:5]}")
    texts = table.column("text").to_pylist()
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise ValueError(f"{path}: {len(empty)} empty or missing texts, first at row {empty[0]}")


def _split_files(directory: Path, split: str) -> list[Path]:
    files = sorted(directory.glob(f"{split}-*.parquet")) or sorted(directory.glob(f"{split}.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{directory} has no '{split}-*.parquet' file; expected the layout of the Hub's "
            f"{HUB_DATASET} (train-00000-of-00001.parquet, test-00000-of-00001.parquet)"
        )
    return files


def load_imdb(data_dir: str | os.PathLike[str] | None = None, *, progress: bool = False) -> IMDBText:
    """Load the 50,000 labelled IMDB reviews through Hugging Face ``datasets``.

    Args:
        data_dir: a directory of Parquet files in the layout of the Hub's ``stanfordnlp/imdb``.
            Defaults to the environment variable ``PBA_IMDB_DIR``; when neither is set the Hub is
            used, unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set, which fails at once.
        progress: show the progress bars of ``datasets``.
    """
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return _load_imdb(data_dir)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_imdb(data_dir: str | os.PathLike[str] | None) -> IMDBText:
    from datasets import load_dataset

    if data_dir is None and os.environ.get(IMDB_DIR_ENV):
        data_dir = os.environ[IMDB_DIR_ENV]
    if data_dir is None:
        if _offline():
            raise RuntimeError(
                "IMDB is not available offline: either pass data_dir (or set "
                f"{IMDB_DIR_ENV}) to a directory holding the Parquet files of the Hub's "
                f"{HUB_DATASET}, or go online and unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                "to download it from the Hub"
            )
        dataset = load_dataset(HUB_DATASET)
        source = f"hub:{HUB_DATASET}"
    else:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"data_dir must be a directory of Parquet files, got {directory}")
        files = {split: _split_files(directory, split) for split in ("train", "test")}
        for paths in files.values():
            for path in paths:
                _check_parquet(path)
        dataset = load_dataset(
            "parquet", data_files={k: [str(p) for p in v] for k, v in files.items()}
        )
        source = f"dir:{directory.resolve()}"
    return IMDBText(
        train_texts=list(dataset["train"]["text"]),
        train_labels=np.asarray(dataset["train"]["label"], dtype=np.int64),
        test_texts=list(dataset["test"]["text"]),
        test_labels=np.asarray(dataset["test"]["label"], dtype=np.int64),
        source=source,
    )


# ----------------------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class TokenizerConfig:
    """Every choice the tokenizer makes.

    Attributes:
        vocab_size: total ids, special tokens included.
        length: ``l``, the fixed number of ids per review.
        truncation: ``"head"`` keeps the first words, ``"tail"`` the last ones.
        padding: ``"right"`` pads after the words, ``"left"`` before them.
        start_token: put ``<SOS>`` before the words. It counts towards ``length`` and is truncated
            like a word, so ``"tail"`` truncation of a long review drops it (as Keras does).
        unknown_as_padding: map unknown words to the padding id, as the reference did; ``False``
            (default) gives them their own ``<UNK>`` id.
    """

    vocab_size: int = 20_000
    length: int = 32
    truncation: Literal["head", "tail"] = "head"
    padding: Literal["right", "left"] = "right"
    start_token: bool = True
    unknown_as_padding: bool = False

    def __post_init__(self) -> None:
        if self.truncation not in ("head", "tail"):
            raise ValueError(f"truncation must be 'head' or 'tail', got {self.truncation!r}")
        if self.padding not in ("right", "left"):
            raise ValueError(f"padding must be 'right' or 'left', got {self.padding!r}")
        if self.length < 1 + self.start_token:
            raise ValueError(f"length must leave room for a word, got {self.length}")
        if self.vocab_size <= len(self.specials):
            raise ValueError(
                f"vocab_size must exceed the {len(self.specials)} special tokens, got {self.vocab_size}"
            )

    @property
    def specials(self) -> tuple[str, ...]:
        """The special tokens in id order (``<PAD>`` = 0, then ``<UNK>`` unless unknown words pad)."""
        return (PAD,) + (() if self.unknown_as_padding else (UNK,)) + (SOS,)


class Tokenizer:
    """Whitespace tokenizer over :func:`clean_text`, with a frequency-ranked vocabulary.

    Build it with :meth:`fit` on training texts only. Ties in frequency keep first-seen order
    (``collections.Counter.most_common``), so the vocabulary is deterministic.
    """

    def __init__(self, config: TokenizerConfig, words: Sequence[str]) -> None:
        self.config = config
        self.itos: list[str] = list(config.specials) + list(words)
        if len(self.itos) > config.vocab_size:
            raise ValueError(f"{len(self.itos)} tokens exceed vocab_size={config.vocab_size}")
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_id = 0
        self.unk_id = self.pad_id if config.unknown_as_padding else self.stoi[UNK]
        self.sos_id = self.stoi[SOS]

    @classmethod
    def fit(cls, texts: Sequence[str], config: TokenizerConfig) -> Tokenizer:
        """The ``vocab_size - len(specials)`` most frequent words of ``texts``."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(clean_text(text).split())
        n_words = config.vocab_size - len(config.specials)
        return cls(config, [word for word, _ in counts.most_common(n_words)])

    def encode(self, text: str) -> list[int]:
        """One review -> exactly ``length`` ids."""
        cfg = self.config
        words = clean_text(text).split()
        # Only the words that can survive truncation are looked up (a review averages ~230 words).
        words = words[: cfg.length] if cfg.truncation == "head" else words[-cfg.length :]
        ids = [self.sos_id] * cfg.start_token + [self.stoi.get(w, self.unk_id) for w in words]
        # Like Keras' pad_sequences, tail truncation drops <SOS> too when the review is long.
        ids = ids[: cfg.length] if cfg.truncation == "head" else ids[-cfg.length :]
        padding = [self.pad_id] * (cfg.length - len(ids))
        return ids + padding if cfg.padding == "right" else padding + ids

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Reviews -> ``(N, length)`` int64 ids."""
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.int64).view(-1, self.config.length)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def __len__(self) -> int:
        return len(self.itos)


# ----------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """How reviews are split and tokenised."""

    name: str
    split: Literal["pooled-random", "official"]
    tokenizer: TokenizerConfig
    train_size: int = 40_000
    val_size: int = 4_000
    val_fraction: float = 0.1
    vocab_from: Literal["train", "all"] = "train"


PROTOCOLS: dict[str, Protocol] = {
    "seed": Protocol(
        "seed",
        "pooled-random",
        TokenizerConfig(truncation="head", padding="right", start_token=True),
    ),
    "paper": Protocol(
        "paper",
        "official",
        TokenizerConfig(truncation="tail", padding="left", start_token=True),
    ),
}


@dataclass
class EncodedSplits:
    """Token ids and float labels of the train, validation and test splits, plus the vocabulary."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    vocab: list[str]
    settings: dict

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)[1]) for name in ("train", "val", "test")}


def _split_indices(protocol: Protocol, n_train: int, n_test: int, split_seed: int) -> dict[str, np.ndarray]:
    """Indices into the concatenation ``train + test`` of the official splits."""
    if protocol.split == "pooled-random":
        order = np.random.default_rng(split_seed).permutation(n_train + n_test)
        a, b = protocol.train_size, protocol.train_size + protocol.val_size
        return {"train": order[:a], "val": order[a:b], "test": order[b:]}
    n_val = int(round(n_train * protocol.val_fraction))
    train = np.arange(n_train)
    return {"train": train[: n_train - n_val], "val": train[n_train - n_val :], "test": n_train + np.arange(n_test)}


def prepare_imdb(
    protocol: str | Protocol = "seed",
    *,
    data: IMDBText | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    split_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    **tokenizer_overrides: object,
) -> EncodedSplits:
    """Split and encode IMDB under a protocol; cached on disk keyed by every setting and the data.

    Args:
        protocol: ``"seed"`` or ``"paper"`` (or a :class:`Protocol`).
        data: already loaded texts; otherwise :func:`load_imdb` (``data_dir``) is called.
        split_seed: the random split of the ``seed`` protocol.
        cache_dir: where encoded splits are kept (default ``PBA_CACHE_DIR`` or ``~/.cache/pba``).
        use_cache: read and write the cache.
        tokenizer_overrides: fields of :class:`TokenizerConfig` to change, and ``vocab_from``
            (``"train"``, default, or ``"all"``: the reference built its vocabulary on all reviews).
    """
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
        protocol = PROTOCOLS[protocol]
    vocab_from = tokenizer_overrides.pop("vocab_from", protocol.vocab_from)
    if vocab_from not in ("train", "all"):
        raise ValueError(f"vocab_from must be 'train' or 'all', got {vocab_from!r}")
    unknown = set(tokenizer_overrides) - {f.name for f in dataclasses.fields(TokenizerConfig)}
    if unknown:
        raise TypeError(f"unknown tokenizer settings {sorted(unknown)}")
    config = dataclasses.replace(protocol.tokenizer, **tokenizer_overrides)  # type: ignore[arg-type]
    data = load_imdb(data_dir) if data is None else data
    settings = {
        "protocol": protocol.name,
        "split": protocol.split,
        "split_seed": split_seed,
        "vocab_from": vocab_from,
        "tokenizer": dataclasses.asdict(config),
        "data": data.fingerprint(),
        "format": 2,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = _cache_dir(cache_dir) / f"imdb-{protocol.name}-{key}.pt"
    if use_cache and path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("settings") == settings:
            return _splits_from(cached)

    texts = data.train_texts + data.test_texts
    labels = np.concatenate([data.train_labels, data.test_labels])
    index = _split_indices(protocol, len(data.train_texts), len(data.test_texts), split_seed)
    vocab_texts = texts if vocab_from == "all" else [texts[i] for i in index["train"]]
    tokenizer = Tokenizer.fit(vocab_texts, config)
    ids = tokenizer.encode_batch(texts)
    targets = torch.from_numpy(labels.astype(np.float32))
    payload = {
        "settings": settings,
        "vocab": tokenizer.itos,
        **{name: (ids[torch.from_numpy(idx)], targets[torch.from_numpy(idx)]) for name, idx in index.items()},
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda file: torch.save(payload, file), binary=True)
    return _splits_from(payload)


def _splits_from(payload: dict) -> EncodedSplits:
    return EncodedSplits(
        train=tuple(payload["train"]),  # type: ignore[arg-type]
        val=tuple(payload["val"]),  # type: ignore[arg-type]
        test=tuple(payload["test"]),  # type: ignore[arg-type]
        vocab=list(payload["vocab"]),
        settings=payload["settings"],
    )
