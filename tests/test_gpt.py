"""The character-level GPT (pba.models.gpt) with every variant, and Tiny Shakespeare (pba.data.shakespeare)."""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pba
from pba.data.shakespeare import (
    SHAKESPEARE_SHA256,
    CharCorpus,
    load_shakespeare,
)
from pba.models.gpt import GPT, GPTConfig, generate
from pba.train import TrainConfig, make_optimizer

VOCAB = 65
TINY = {"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}


def tiny(variant: str, **overrides: object) -> GPT:
    return GPT(GPTConfig(**{**TINY, "variant": variant, **overrides}))


# ------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_shapes_and_causality(variant: str) -> None:
    model = tiny(variant).eval()
    with torch.no_grad():  # any weights, not only the initial ones (super: W^A full, not triangular)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(0, VOCAB, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 16, VOCAB) and logits.dtype == torch.float32
    t = 6
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, VOCAB - 1, (3, 16 - t - 1))) % VOCAB
    other = model(changed)
    torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5)
    assert (other[:, t + 1 :] - logits[:, t + 1 :]).abs().amax() > 1e-3  # the later tokens are read
    # a shorter input gives the prefix of the longer one's logits (super: W^A[:T, :T], lower-triangular)
    torch.testing.assert_close(model(ids[:, :5]), logits[:, :5], rtol=0, atol=1e-5)


def test_super_never_reads_the_upper_triangle_of_wa() -> None:
    model = tiny("super").eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    before = model(ids)
    upper = torch.ones(16, 16, dtype=torch.bool).triu(1)
    for block in model.blocks:
        wa = block.attn.wa_weight
        assert (wa[upper] == 0).all() and (wa.diagonal() != 0).all()  # init: lower-triangular
        with torch.no_grad():
            wa[upper] = 5.0  # anything written above the diagonal must not leak the future
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-6)


def test_causal_wa_init_gives_every_row_the_same_scale() -> None:
    model = tiny("super", block_size=256, n_layer=1)
    wa = model.blocks[0].attn.wa_weight.detach()
    row_variance = (wa**2).sum(1)  # expected 1 for every row (variance 1/(t+1) times t+1 entries)
    assert row_variance[-64:].mean() == pytest.approx(1.0, abs=0.15)
    assert row_variance[:64].mean() == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_untrained_loss_is_near_uniform(variant: str) -> None:
    model = tiny(variant).eval()
    ids = torch.randint(0, VOCAB, (8, 16))
    targets = torch.randint(0, VOCAB, (8, 16))
    loss = F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_generate(variant: str) -> None:
    model = tiny(variant).train()
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1))  # 25 > block_size
    assert out.shape == (2, 25) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert model.training  # the mode is restored
    again = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, out)
    other = generate(model, prompt, 20, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other, out)
    # top_k=1 is greedy decoding, whatever the temperature and the generator
    greedy = prompt
    model.eval()
    with torch.no_grad():
        for _ in range(20):
            greedy = torch.cat((greedy, model(greedy[:, -16:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    top1 = generate(model, prompt, 20, top_k=1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)
    assert not model.training and generate(model, prompt, 0).shape == (2, 5)


# -------------------------------------------------------------------------- key/value cache
LAYER_CASES = [(v, {}) for v in pba.VARIANTS] + [(v, {"fused": False}) for v in pba.VARIANTS] + [
    ("super", {"wa_bias": True}),
    ("super", {"wa_sharing": "head"}),
    ("super", {"wa_sharing": "head", "wa_bias": True}),
]


@pytest.mark.parametrize(("variant", "options"), LAYER_CASES, ids=lambda c: str(c))
def test_layer_decode_in_chunks_equals_the_causal_forward(variant: str, options: dict) -> None:
    torch.manual_seed(0)
    extra = {"context_length": 12, **options} if variant == "super" else options
    layer = pba.make_attention(variant, 16, 4, **extra).eval()
    with torch.no_grad():
        for param in layer.parameters():  # any weights: super's W^A full, a non-zero W^A bias
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(2, 10, 16)
    cache = pba.KVCache()
    chunks = [(0, 3), (3, 4), (4, 5), (5, 7), (7, 10)]  # a prompt, single tokens, a chunk
    out = torch.cat([layer.decode(x[:, a:b], cache) for a, b in chunks], dim=1)
    torch.testing.assert_close(out, layer(x, is_causal=True), atol=1e-6, rtol=1e-5)
    assert cache.length == 10 and cache.keys.shape == cache.values.shape == (2, 4, 10, 4)
    assert cache.layer == type(layer).__name__ and "length=10" in repr(cache)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_layer_decode_under_autocast_and_in_training(variant: str) -> None:
    torch.manual_seed(0)
    layer = pba.make_attention(variant, 16, 4, dropout=0.5, **({"context_length": 8} if variant == "super" else {}))
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.eval()
        cache = pba.KVCache()
        out = torch.cat([layer.decode(x[:, :5], cache), layer.decode(x[:, 5:], cache)], dim=1)
        torch.testing.assert_close(out.float(), layer(x, is_causal=True).float(), atol=2e-2, rtol=2e-2)
    layer.train()  # dropout on the attention weights: the shape is all that is defined
    assert layer.decode(x[:, :3], pba.KVCache()).shape == (2, 3, 16)


def test_model_decode_failing_in_a_block_leaves_every_cache_as_it_was() -> None:
    model = tiny("super").eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    caches = model.new_caches()
    model.decode(ids[:, :3], caches)
    broken = model.blocks[1].attn
    broken.project_query = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # block 1 fails after block 0 ran
    with pytest.raises(RuntimeError, match="boom"):
        model.decode(ids[:, 3:5], caches)
    del broken.project_query
    assert [c.length for c in caches] == [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(model.decode(ids[:, 3:], caches), model(ids)[:, 3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="caches must be a list of 2 KVCache"):
        model.decode(ids[:, :1], [pba.KVCache(), {}])
    uneven = model.new_caches()
    model.blocks[0].attn.decode(torch.randn(1, 1, 32), uneven[0])
    with pytest.raises(ValueError, match=r"caches must all hold the same positions, got lengths \[1, 0\]"):
        model.decode(ids[:, :1], uneven)


def test_layer_decode_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="softmax"):
        pba.StandardAttention(8, 2, softmax_over="queries").decode(torch.randn(1, 1, 8), pba.KVCache())
    layer = pba.SuperAttention(8, 2, context_length=4)
    cache = pba.KVCache()
    layer.decode(torch.randn(1, 4, 8), cache)
    with pytest.raises(ValueError, match="at most context_length=4 positions, got 5"):
        layer.decode(torch.randn(1, 1, 8), cache)
    with pytest.raises(ValueError, match=r"\(batch, n_heads, t, d_k\) = \(3, 2, 4, 4\) for x of batch size 3, got \(\(1, 2, 4, 4\)"):
        layer.decode(torch.randn(3, 1, 8), cache)
    with pytest.raises(TypeError, match="cache must be a pba.KVCache"):
        layer.decode(torch.randn(1, 1, 8), {})
    with pytest.raises(ValueError, match="x must hold at least one new token"):
        layer.decode(torch.randn(1, 0, 8), pba.KVCache())
    with pytest.raises(ValueError, match="filled by a SuperAttention, not a EfficientAttention"):
        pba.EfficientAttention(8, 2).decode(torch.randn(1, 1, 8), cache)
    small = pba.SuperAttention(8, 2, context_length=6)
    small_cache = pba.KVCache()
    small.decode(torch.randn(1, 2, 8), small_cache)
    with pytest.raises(ValueError, match="cache holds torch.float32 keys.*this call makes torch.float64"):
        small.double().decode(torch.randn(1, 1, 8, dtype=torch.float64), small_cache)
    assert small_cache.length == 2  # a refused call changes nothing


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_model_decode_equals_forward_and_cached_generation_the_uncached(variant: str) -> None:
    torch.manual_seed(0)
    model = tiny(variant).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    caches = model.new_caches()
    with torch.no_grad():
        logits = torch.cat([model.decode(ids[:, :9], caches), model.decode(ids[:, 9:10], caches), model.decode(ids[:, 10:], caches)], 1)
        torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more than block_size=16"):
        model.decode(ids[:, :1], caches)
    with pytest.raises(ValueError, match="ids has batch size 3 but the caches hold 2"):
        model.decode(ids[:1, :1].expand(3, 1), caches)
    prompt = ids[:, :3]
    for options in ({"top_k": 1}, {"temperature": 0.8}):  # greedy, and sampled with one seed
        cached = generate(model, prompt, 30, generator=torch.Generator().manual_seed(5), **options)  # past block_size
        plain = generate(model, prompt, 30, generator=torch.Generator().manual_seed(5), use_cache=False, **options)
        assert torch.equal(cached, plain)


def test_generate_rejects_bad_arguments() -> None:
    model = tiny("standard")
    prompt = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="idx must be an int64 or int32 tensor.*float32"):
        generate(model, prompt.float(), 2)
    with pytest.raises(TypeError, match="use_cache must be a bool"):
        generate(model, prompt, 2, use_cache=1)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_bad_ids_are_named(variant: str) -> None:
    model = tiny(variant)
    with pytest.raises(ValueError, match="ids must have at most block_size=16 tokens, got length 17"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids must be an int64 or int32 tensor.*got dtype torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=65\), got values in \[0, 65\]"):
        model(torch.tensor([[0, 65]]))
    with pytest.raises(ValueError, match=r"ids must have shape \(batch, length\)"):
        model(torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"n_embd": 30}, "n_embd must be divisible by n_head, got n_embd=30, n_head=4"),
        ({"variant": "fast"}, "variant must be one of .*got 'fast'"),
        ({"block_size": 0}, "block_size must be a positive int, got 0"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1.0"),
        ({"tie_weights": 1}, "tie_weights must be a bool, got 1"),
    ],
)
def test_bad_config_is_named(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        GPTConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_weight_decay_groups_and_tied_head(variant: str) -> None:
    model = tiny(variant)
    assert model.head.weight is model.tok_emb.weight
    untied = tiny(variant, tie_weights=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(model) == VOCAB * 32
    # pba.train.make_optimizer decays exactly the >= 2-D tensors, W^A included, each once
    optimizer = make_optimizer(list(model.parameters()), TrainConfig(optimizer="adamw", weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) | ids(no_decay) == {id(p) for p in model.parameters()}
    assert not ids(decay) & ids(no_decay)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    if variant == "super":
        assert all(id(b.attn.wa_weight) in ids(decay) for b in model.blocks)


def test_standard_variant_is_initialised_like_nanogpt() -> None:
    model = tiny("standard", n_embd=256, n_head=4, n_layer=2)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert model.blocks[1].mlp.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_dropout_acts_in_training_only() -> None:
    model = tiny("super", dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 16))
    assert not torch.equal(model.train()(ids), model(ids))
    torch.testing.assert_close(model.eval()(ids), model(ids))


# ------------------------------------------------------------------------------------ data
@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No directory from the environment, online, and a private cache."""
    for name in ("PBA_SHAKESPEARE_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PBA_CACHE_DIR", str(tmp_path / "cache"))


def write_text(directory: Path, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "input.txt").write_bytes(content)
    return directory


def test_real_file(shakespeare_dir: Path) -> None:
    corpus = load_shakespeare(shakespeare_dir)
    assert len(corpus.train) + len(corpus.val) == 1_115_394
    assert (len(corpus.train), len(corpus.val)) == (1_003_854, 111_540)  # int(n * 0.9), nanoGPT's split
    assert corpus.vocab_size == 65 and corpus.chars[:3] == ("\n", " ", "!")
    assert corpus.train.dtype == torch.int64 and corpus.source.startswith("file:")
    assert corpus.decode(corpus.train[:14]) == "First Citizen:"
    text = "ROMEO:\nBut soft! what light through yonder window breaks?"
    assert corpus.decode(corpus.encode(text)) == text


def test_own_text_with_verify_off(tmp_path: Path, no_env: None) -> None:
    text = "to be, or not to be: that is the question.\n" * 3  # 129 characters
    directory = write_text(tmp_path / "mine", text.encode())
    got = hashlib.sha256(text.encode()).hexdigest()
    pattern = f"differs from the known Tiny Shakespeare.*expected {SHAKESPEARE_SHA256}, got {got}.*verify=False"
    with pytest.raises(ValueError, match=pattern):
        load_shakespeare(directory)
    corpus = load_shakespeare(directory, verify=False)
    assert isinstance(corpus, CharCorpus)
    assert corpus.chars == tuple(sorted(set(text)))
    assert (len(corpus.train), len(corpus.val)) == (116, 13)
    assert corpus.decode(torch.cat((corpus.train, corpus.val))) == text
    with pytest.raises(ValueError, match="'Z', which is not in the vocabulary"):
        corpus.encode("Zounds")
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, vocab_size="):
        corpus.decode([corpus.vocab_size])
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, vocab_size=.*got values in \[-1, 0\]"):
        corpus.decode(torch.tensor([0, -1]))


def test_missing_directory_and_file(tmp_path: Path, no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="argument data_dir must name a directory, got .*nowhere"):
        load_shakespeare(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir \\(from argument data_dir\\) holds no input.txt"):
        load_shakespeare(tmp_path / "empty_dir")
    monkeypatch.setenv("PBA_SHAKESPEARE_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="environment variable PBA_SHAKESPEARE_DIR must name a directory"):
        load_shakespeare()


def test_empty_and_non_utf8_files(tmp_path: Path, no_env: None) -> None:
    with pytest.raises(ValueError, match="input.txt \\(from argument data_dir\\) is empty"):
        load_shakespeare(write_text(tmp_path / "a", b""), verify=False)
    with pytest.raises(ValueError, match="is not UTF-8 text \\(byte 5"):
        load_shakespeare(write_text(tmp_path / "b", b"hello\xff world, more text here"), verify=False)
    with pytest.raises(ValueError, match="holds 5 characters; each split needs at least two"):
        load_shakespeare(write_text(tmp_path / "c", b"hello"), verify=False)


def test_offline_without_directory_names_both(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("urllib.request.urlopen", _no_network)
    with pytest.raises(RuntimeError, match=r"not available offline: pass data_dir \(or set PBA_SHAKESPEARE_DIR\)"):
        load_shakespeare()


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the network must not be used")


#: the real file's directory, read at import, before any test's monkeypatch clears the variable
REAL_DIR = os.environ.get("PBA_SHAKESPEARE_DIR")


def serve(monkeypatch: pytest.MonkeyPatch, body: bytes) -> dict:
    """Replace urlopen by one that serves ``body``; returns a counter of calls."""
    calls = {"n": 0}

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        assert url == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
        calls["n"] += 1
        return io.BytesIO(body)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    return calls


def test_bad_download_fails_and_is_not_cached(tmp_path: Path, no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(monkeypatch, b"not shakespeare at all, just some other text\n")
    with pytest.raises(ValueError, match="the download from https://.*differs from the known Tiny Shakespeare"):
        load_shakespeare()
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


def test_download_is_cached(tmp_path: Path, no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    if not REAL_DIR:
        pytest.skip("needs the real file to serve: set PBA_SHAKESPEARE_DIR to the directory of input.txt")
    body = (Path(REAL_DIR) / "input.txt").read_bytes()
    calls = serve(monkeypatch, body)
    corpus = load_shakespeare()
    assert corpus.source.startswith("url:https://") and corpus.vocab_size == 65
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == body and calls["n"] == 1
    assert len(load_shakespeare().val) == 111_540 and calls["n"] == 1  # the second load reads the cache


# ------------------------------------------------------------------------------------ batches


def test_identity_wa_init_starts_super_as_efficient() -> None:
    torch.manual_seed(0)
    sup = GPT(GPTConfig(**{**TINY, "variant": "super", "wa_init": "identity"}))
    eff = GPT(GPTConfig(**{**TINY, "variant": "efficient"}))
    assert all(torch.equal(b.attn.wa_weight, torch.eye(b.attn.wa_weight.shape[0])) for b in sup.blocks)
    eff.load_state_dict({k: v for k, v in sup.state_dict().items() if "wa_weight" not in k})
    ids = torch.randint(0, VOCAB, (2, TINY["block_size"]))
    torch.testing.assert_close(sup(ids), eff(ids))
    with pytest.raises(ValueError, match=r"wa_init must be one of \('random', 'identity'\), got 'zeros'"):
        GPTConfig(**{**TINY, "wa_init": "zeros"})
