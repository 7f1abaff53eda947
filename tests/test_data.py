"""pba.data: cleaning, the tokenizer's options, protocols, caching and bad data directories."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pba.data import PROTOCOLS, IMDBText, Tokenizer, TokenizerConfig, clean_text, load_imdb, prepare_imdb

from .synthetic import write_imdb_like


def test_clean_text() -> None:
    assert clean_text("Great film!<br /><br />10/10, would WATCH again.") == "great film  1010 would watch again"
    assert clean_text("<br/>It's   \"fine\"<br>") == "its   fine"


def fit(texts: list[str], **options: object) -> Tokenizer:
    return Tokenizer.fit(texts, TokenizerConfig(**options))


def test_vocabulary_by_frequency_with_first_seen_ties() -> None:
    tok = fit(["b a a", "c b d"], vocab_size=6, length=4)
    assert tok.itos == ["<PAD>", "<UNK>", "<SOS>", "b", "a", "c"]  # b:2, a:2 (b first), c:1 before d:1
    assert (tok.pad_id, tok.unk_id, tok.sos_id) == (0, 1, 2)


def test_head_truncation_right_padding_with_start() -> None:
    tok = fit(["one two three four five six"], vocab_size=20, length=4)
    ids = lambda *ws: [tok.stoi[w] for w in ws]
    assert tok.encode("one two three four five") == [tok.sos_id, *ids("one", "two", "three")]
    assert tok.encode("two") == [tok.sos_id, *ids("two"), 0, 0]


def test_tail_truncation_left_padding_drops_start_like_keras() -> None:
    tok = fit(["one two three four five six"], vocab_size=20, length=4, truncation="tail", padding="left")
    ids = lambda *ws: [tok.stoi[w] for w in ws]
    assert tok.encode("one two three four five") == ids("two", "three", "four", "five")
    assert tok.encode("one two") == [0, tok.sos_id, *ids("one", "two")]


def test_protocols_truncate_as_the_paper_says() -> None:
    """A 40-word review: the paper protocol keeps its last 32 words (Keras), the seed one <SOS> + its first 31."""
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words)
    paper = Tokenizer.fit([text], dataclasses.replace(PROTOCOLS["paper"].tokenizer, vocab_size=50))
    assert paper.encode(text) == [paper.stoi[w] for w in words[-32:]]
    seed = Tokenizer.fit([text], dataclasses.replace(PROTOCOLS["seed"].tokenizer, vocab_size=50))
    assert seed.encode(text) == [seed.sos_id] + [seed.stoi[w] for w in words[:31]]


def test_no_start_token_and_unknown_words() -> None:
    tok = fit(["a b"], vocab_size=10, length=3, start_token=False)
    assert tok.encode("a zebra") == [tok.stoi["a"], tok.unk_id, 0]
    quirky = fit(["a b"], vocab_size=10, length=3, start_token=False, unknown_as_padding=True)
    assert quirky.itos[:2] == ["<PAD>", "<SOS>"]
    assert quirky.encode("a zebra") == [quirky.stoi["a"], 0, 0]  # unknown == padding


def test_vocab_size_caps_words() -> None:
    tok = fit(["a a a b b c"], vocab_size=5, length=3)
    assert tok.itos == ["<PAD>", "<UNK>", "<SOS>", "a", "b"]
    assert tok.encode("c") == [tok.sos_id, tok.unk_id, 0]


def test_bad_tokenizer_settings() -> None:
    with pytest.raises(ValueError, match="truncation must be 'head' or 'tail', got 'middle'"):
        TokenizerConfig(truncation="middle")
    with pytest.raises(ValueError, match="vocab_size must exceed the 3 special tokens, got 3"):
        TokenizerConfig(vocab_size=3)


# ------------------------------------------------------------------------------- protocols
def synthetic_text(n_train: int, n_test: int) -> IMDBText:
    train = [f"train review {i} word{i % 7}" for i in range(n_train)]
    test = [f"test review {i} other{i % 5}" for i in range(n_test)]
    return IMDBText(train, np.arange(n_train) % 2, test, np.arange(n_test) % 2, "synthetic")


def test_paper_protocol_split_and_train_only_vocabulary(tmp_path: Path) -> None:
    data = synthetic_text(100, 60)
    splits = prepare_imdb("paper", data=data, cache_dir=tmp_path)
    assert splits.sizes() == {"train": 90, "val": 10, "test": 60}
    assert "test" not in splits.vocab and "other0" not in splits.vocab  # counted on train only
    assert "word3" in splits.vocab
    every = prepare_imdb("paper", data=data, cache_dir=tmp_path, vocab_from="all")
    assert "other0" in every.vocab


def test_seed_protocol_pools_and_splits_disjointly(tmp_path: Path) -> None:
    # Each review spells its own index in words, so encoded rows identify reviews.
    digits = "zero one two three four five six seven eight nine".split()
    spell = lambda i: " ".join(digits[int(c)] for c in f"{i:05d}")
    texts = [spell(i) for i in range(55_000)]
    labels = np.arange(55_000) % 2
    data = IMDBText(texts[:30_000], labels[:30_000], texts[30_000:], labels[30_000:], "spelled")
    splits = prepare_imdb("seed", data=data, cache_dir=tmp_path)
    assert splits.sizes() == {"train": 40_000, "val": 4_000, "test": 11_000}
    rows = [set(map(tuple, getattr(splits, s)[0].tolist())) for s in ("train", "val", "test")]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    other = prepare_imdb("seed", data=data, cache_dir=tmp_path, split_seed=1)
    assert not torch.equal(other.val[0], splits.val[0])


def test_cache_is_keyed_by_every_setting_and_the_data(tmp_path: Path) -> None:
    data = synthetic_text(50, 20)
    first = prepare_imdb("paper", data=data, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = prepare_imdb("paper", data=data, cache_dir=tmp_path)
    assert torch.equal(first.train[0], again.train[0])
    longer = prepare_imdb("paper", data=data, cache_dir=tmp_path, length=8)
    assert longer.train[0].shape[1] == 8 and len(list(tmp_path.glob("*.pt"))) == 2
    changed = IMDBText(["new words here"] * 50, data.train_labels, data.test_texts, data.test_labels, "x")
    assert "new" in prepare_imdb("paper", data=changed, cache_dir=tmp_path).vocab
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_protocol_and_settings() -> None:
    with pytest.raises(ValueError, match=r"protocol must be one of \('seed', 'paper'\), got 'kaggle'"):
        prepare_imdb("kaggle", data=synthetic_text(5, 5))
    with pytest.raises(TypeError, match=r"unknown tokenizer settings \['lenght'\]"):
        prepare_imdb("paper", data=synthetic_text(5, 5), lenght=3)


# ------------------------------------------------------------------------------- loading
def test_load_local_directory(tmp_path: Path) -> None:
    data = load_imdb(write_imdb_like(tmp_path, 20, 10))
    assert len(data.train_texts) == 20 and len(data.test_texts) == 10
    assert set(data.train_labels.tolist()) == {0, 1}


def test_load_directory_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBA_IMDB_DIR", str(write_imdb_like(tmp_path, 6, 4)))
    assert len(load_imdb().test_texts) == 4


def test_offline_without_directory_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PBA_IMDB_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"pass data_dir \(or set PBA_IMDB_DIR\).*go online"):
        load_imdb()
    assert time.perf_counter() - start < 2


def write_table(path: Path, **columns: list) -> None:
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize(
    ("columns", "pattern"),
    [
        ({"review": ["a"], "label": [0]}, r"must have columns 'text' and 'label', missing \['text'\]"),
        ({"text": ["a", "b"], "label": [0, 2]}, r"labels must be 0 or 1, found \[2\]"),
        ({"text": ["a", "  "], "label": [0, 1]}, r"1 empty or missing texts, first at row 1"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, columns: dict, pattern: str) -> None:
    write_imdb_like(tmp_path, 4, 4)
    write_table(tmp_path / "test-00000-of-00001.parquet", **columns)
    with pytest.raises(ValueError, match="test-00000-of-00001.parquet.*" + pattern):
        load_imdb(tmp_path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_dir must be a directory"):
        load_imdb(tmp_path / "nowhere")
    write_imdb_like(tmp_path, 4, 4)
    (tmp_path / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no 'test-\*.parquet' file"):
        load_imdb(tmp_path)
    (tmp_path / "test-00000-of-00001.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="test-00000-of-00001.parquet is not a readable Parquet file"):
        load_imdb(tmp_path)


# ------------------------------------------------------------------------------- real reviews
def test_real_imdb_protocols(imdb_dir: Path, tmp_path: Path) -> None:
    data = load_imdb(imdb_dir)
    assert len(data.train_texts) == len(data.test_texts) == 25_000
    seed = prepare_imdb("seed", data=data, cache_dir=tmp_path)
    assert seed.sizes() == {"train": 40_000, "val": 4_000, "test": 6_000}
    assert len(seed.vocab) == 20_000 and seed.vocab[:3] == ["<PAD>", "<UNK>", "<SOS>"]
    assert (seed.train[0][:, 0] == 2).all()  # every review starts with <SOS>
    assert abs(seed.train[1].mean().item() - 0.5) < 0.02
    paper = prepare_imdb("paper", data=data, cache_dir=tmp_path)
    assert paper.sizes() == {"train": 22_500, "val": 2_500, "test": 25_000}
    assert (paper.train[0][:, -1] != 0).all()  # the last word is always kept


def test_real_imdb_encoding_is_fast(imdb_dir: Path, tmp_path: Path) -> None:
    data = load_imdb(imdb_dir)
    start = time.perf_counter()
    prepare_imdb("seed", data=data, cache_dir=tmp_path)
    assert time.perf_counter() - start < 60  # seconds, not minutes (typically ~6 s)
