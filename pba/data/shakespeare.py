"""Character-level Tiny Shakespeare: loading (a local directory or a download), split, batches.

Data flow: :func:`load_shakespeare` (one text file -> :class:`CharCorpus`: the training and
validation characters as token ids, and the vocabulary) -> :class:`pba.train.LanguageModeling`,
which cuts windows of ``block_size`` characters and their next-character targets.

The corpus is the ``input.txt`` of Karpathy's char-rnn (1,115,394 characters, 65 symbols), the one
nanoGPT's ``shakespeare_char`` uses, split as nanoGPT's ``prepare.py`` splits it: the first 90 % of
the characters train, the last 10 % validate, and the vocabulary is the sorted set of characters of
the whole file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import write_atomic
from ._common import OFFLINE_ENVS, cache_dir, offline

__all__ = [
    "SHAKESPEARE_DIR_ENV",
    "SHAKESPEARE_URL",
    "SHAKESPEARE_SHA256",
    "CharCorpus",
    "load_shakespeare",
]

#: environment variable naming a local directory that holds ``input.txt``
SHAKESPEARE_DIR_ENV = "PBA_SHAKESPEARE_DIR"
#: where the file is downloaded from when no directory is given (char-rnn's copy, as nanoGPT)
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
#: SHA-256 of that ``input.txt`` (1,115,394 bytes)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FILE_NAME = "input.txt"


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A character-level corpus: both splits as int64 ids, and the vocabulary.

    Attributes:
        train: ids of the first 90 % of the characters, ``(N,)`` int64.
        val: ids of the last 10 %, ``(M,)`` int64.
        chars: the vocabulary, sorted; id ``i`` is ``chars[i]``.
        source: where the text came from (``file:<path>`` or ``url:<address>``).
    """

    train: Tensor
    val: Tensor
    chars: tuple[str, ...]
    source: str
    _stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            ids = getattr(self, name)
            if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.int64:
                got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
                raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}")
        if not self.chars or any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise ValueError(f"chars must be a non-empty tuple of single characters, got {self.chars!r:.80}")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("chars must be sorted and free of repeats")
        object.__setattr__(self, "_stoi", {c: i for i, c in enumerate(self.chars)})

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters (65 for Tiny Shakespeare)."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Characters -> ids; a character outside the vocabulary is a ``ValueError`` naming it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self._stoi[c] for c in text]
        except KeyError as error:
            raise ValueError(
                f"text holds the character {error.args[0]!r}, which is not in the vocabulary of "
                f"{self.vocab_size} characters"
            ) from None

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Ids (a list, or a 1-D integer tensor) -> the text."""
        chars = self.chars
        if isinstance(ids, Tensor):
            if not _is_integer(ids) or ids.dim() != 1:
                raise ValueError(f"ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(chars)):
                low, high = int(ids.min()), int(ids.max())
                raise ValueError(f"ids must be ints in [0, vocab_size={len(chars)}), got values in [{low}, {high}]")
            return "".join(map(chars.__getitem__, ids.tolist()))
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(chars):
                raise ValueError(f"ids must be ints in [0, vocab_size={len(chars)}), got {i!r}")
            out.append(chars[i])
        return "".join(out)


# ----------------------------------------------------------------------------------- loading
def load_shakespeare(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CharCorpus:
    """Tiny Shakespeare as a :class:`CharCorpus` (first 90 % train, last 10 % validation).

    Args:
        data_dir: a directory holding ``input.txt``. Defaults to the environment variable
            ``PBA_SHAKESPEARE_DIR``. When neither is set the file is downloaded from
            :data:`SHAKESPEARE_URL` into the cache (once), unless ``HF_HUB_OFFLINE`` or
            ``HF_DATASETS_OFFLINE`` is set, which fails at once.
        verify: check the local file's SHA-256 against :data:`SHAKESPEARE_SHA256`. Turn it off to
            train on your own text (any UTF-8 file named ``input.txt``). A download is always
            checked.
        cache_dir: where a download is kept (default ``PBA_CACHE_DIR`` or ``~/.cache/pba``).
    """
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    origin = "argument data_dir"
    if data_dir is None and os.environ.get(SHAKESPEARE_DIR_ENV):
        data_dir, origin = os.environ[SHAKESPEARE_DIR_ENV], f"environment variable {SHAKESPEARE_DIR_ENV}"
    if data_dir is not None:
        path = _local_file(Path(data_dir).expanduser(), origin)
        data = path.read_bytes()
        if not data:
            raise ValueError(f"{path} (from {origin}) is empty; expected the Tiny Shakespeare text")
        if verify:
            _check_hash(data, f"{path} (from {origin})")
        source = f"file:{path.resolve()}"
    else:
        if offline():
            raise RuntimeError(
                "Tiny Shakespeare is not available offline: pass data_dir (or set "
                f"{SHAKESPEARE_DIR_ENV}) to a directory holding {FILE_NAME}, or go online (unset "
                f"{' and '.join(OFFLINE_ENVS)}) to download it from {SHAKESPEARE_URL}"
            )
        data = _download(cache_dir)
        source = f"url:{SHAKESPEARE_URL}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{source.split(':', 1)[1]} is not UTF-8 text (byte {error.start}: {error.reason}); "
            "save it as UTF-8"
        ) from None
    return _corpus(text, source)


def _local_file(directory: Path, origin: str) -> Path:
    hint = (
        f"point {origin} at the directory that holds {FILE_NAME}, or leave data_dir and "
        f"{SHAKESPEARE_DIR_ENV} unset to download it"
    )
    if not directory.is_dir():
        raise FileNotFoundError(f"{origin} must name a directory, got {directory}, which is not one; {hint}")
    path = directory / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} (from {origin}) holds no {FILE_NAME}; {hint}")
    return path


def _check_hash(data: bytes, where: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{where} differs from the known Tiny Shakespeare: SHA-256 expected "
            f"{SHAKESPEARE_SHA256}, got {got} ({len(data):,} bytes; the original has 1,115,394). "
            f"Replace it with a fresh copy of {SHAKESPEARE_URL}, or pass verify=False to use your own text"
        )


def _download(directory: str | os.PathLike[str] | None) -> bytes:
    """The file from the cache, or downloaded into it (checked before it is written)."""
    path = cache_dir(directory) / "tinyshakespeare" / FILE_NAME
    if path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256:
            return data  # otherwise a damaged cache entry: download again
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as response:  # noqa: S310 (fixed https URL)
            data = response.read()
    except OSError as error:
        raise RuntimeError(
            f"could not download Tiny Shakespeare from {SHAKESPEARE_URL}: {error}; pass data_dir (or "
            f"set {SHAKESPEARE_DIR_ENV}) to a directory holding a copy of {FILE_NAME}"
        ) from error
    _check_hash(data, f"the download from {SHAKESPEARE_URL}")
    write_atomic(path, lambda file: file.write(data), binary=True)
    return data


def _corpus(text: str, source: str) -> CharCorpus:
    """Encode all characters at once (code points -> ranks among the sorted distinct ones)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    symbols, ids = np.unique(codes, return_inverse=True)  # symbols sorted = sorted(set(text))
    n_train = len(codes) * 9 // 10  # = int(n * 0.9) of nanoGPT, without float rounding
    if n_train < 2 or len(codes) - n_train < 2:
        raise ValueError(
            f"{source} holds {len(codes)} characters; each split needs at least two (at least 20 in all)"
        )
    ids = torch.from_numpy(ids.astype(np.int64).reshape(-1))
    return CharCorpus(
        train=ids[:n_train].clone(),
        val=ids[n_train:].clone(),
        chars=tuple(chr(c) for c in symbols.tolist()),
        source=source,
    )


# ----------------------------------------------------------------------------------- checks
def _is_integer(x: object) -> bool:
    """Whether ``x`` is a tensor of an integer dtype (``bool`` is not one)."""
    return isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
