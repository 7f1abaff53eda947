"""The four layers: parity with torch, explicit == fused, gradients, masks, causality, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import pba
from pba.attention import PROJECTION_ATTRIBUTES, learned_projections, merge_projections

from .reference_attention import reference_attention

D, H, L = 16, 4, 8


def build(variant: str, **options: object) -> pba.StandardAttention:
    options.setdefault("context_length", L)
    layer = pba.make_attention(variant, D, H, **options)
    if isinstance(layer, pba.SuperAttention) and layer.wa_bias is not None:
        nn.init.normal_(layer.wa_bias)  # zero at init; make it matter in the tests
    for name, p in layer.named_parameters():
        if name.endswith("bias") and name != "wa_bias":
            nn.init.normal_(p, std=0.1)
    return layer


def right_padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    """``(B, total)``, ``True`` at padding (torch's convention): item ``b`` has ``lengths[b]`` real tokens."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


OPTION_GRID = [
    dict(bias=b, softmax_over=s)
    for b, s in itertools.product((True, False), ("keys", "queries"))
] + [
    dict(wa_sharing="head"),
    dict(wa_bias=True),
    dict(wa_sharing="head", wa_bias=True),
]


def variant_options() -> list[tuple[str, dict]]:
    cases = []
    for variant in pba.VARIANTS:
        for options in OPTION_GRID:
            if variant != "super" and {"wa_sharing", "wa_bias"} & options.keys():
                continue
            cases.append((variant, options))
    return cases


KEY_SOFTMAX_CASES = [c for c in variant_options() if c[1].get("softmax_over") != "queries"]


# What the paper says each variant learns (PAPER.md, "Definitions"), written apart from pba's classes.
PAPER_MAPS = {
    "standard": {"W^Q", "W^K", "W^V", "W^O"},
    "optimised": {"W^Q", "W^K", "W^O"},
    "efficient": {"W^Q", "W^O"},
    "super": {"W^Q", "W^O", "W^A"},
}


# ------------------------------------------------------------------------------- API
def test_variants_and_factory() -> None:
    assert set(pba.VARIANTS) == set(PAPER_MAPS) and len(pba.VARIANTS) == 4
    classes = [type(pba.make_attention(v, D, H, context_length=L)) for v in pba.VARIANTS]
    assert classes == [
        pba.StandardAttention,
        pba.OptimisedAttention,
        pba.EfficientAttention,
        pba.SuperAttention,
    ]
    assert all(issubclass(c, pba.StandardAttention) for c in classes)
    with pytest.raises(ValueError, match=r"variant must be one of .*'standard'.*got 'linear'"):
        pba.make_attention("linear", D, H)


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
def test_learned_projections_are_the_papers_and_the_layers(variant: str, bias: bool) -> None:
    """The one source of which maps a variant learns agrees with the paper and with the parameters."""
    letters = {"W^Q": "q", "W^K": "k", "W^V": "v", "W^O": "o", "W^A": "a"}
    learned = learned_projections(variant)
    assert set(learned) == {letters[m] for m in PAPER_MAPS[variant]}
    assert list(learned) == [c for c in "qkvoa" if c in learned]  # a fixed order
    layer = pba.make_attention(variant, D, H, context_length=L, bias=bias, wa_bias=True) if variant == "super" else (
        pba.make_attention(variant, D, H, bias=bias)
    )
    owners = {name.split(".")[0] for name, _ in layer.named_parameters()} - {"wa_bias"}
    assert owners == {PROJECTION_ATTRIBUTES[c] for c in learned}


def test_learned_projections_rejects_unknown_variants() -> None:
    with pytest.raises(ValueError, match=r"variant must be one of .*got 'linear'"):
        learned_projections("linear")


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_shapes_and_weights(variant: str) -> None:
    layer = build(variant)
    x = torch.randn(3, L, D)
    y = layer(x)
    assert y.shape == (3, L, D)
    y2, w = layer(x, need_weights=True)
    assert w.shape == (3, H, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, H, L))
    torch.testing.assert_close(y, y2)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_cross_attention(variant: str) -> None:
    layer = build(variant)
    q, kv = torch.randn(2, 5, D), torch.randn(2, L - 2, D)
    y, w = layer(q, kv, need_weights=True)
    assert y.shape == (2, 5, D) and w.shape == (2, H, 5, L - 2)
    torch.testing.assert_close(layer(q, kv, kv), y)


# ------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_standard_equals_torch_multihead_attention(masks: str, bias: bool) -> None:
    mha = nn.MultiheadAttention(D, H, bias=bias, batch_first=True)
    if bias:
        nn.init.normal_(mha.in_proj_bias, std=0.1)
        nn.init.normal_(mha.out_proj.bias, std=0.1)
    mha.eval()
    ours = pba.from_torch(mha).eval()
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 5, 1], L) if masks in ("padding", "both") else None
    causal = masks in ("causal", "both")
    attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None
    expected, expected_w = mha(
        x, x, x,
        key_padding_mask=pad,
        attn_mask=attn_mask,
        need_weights=True,
        average_attn_weights=False,
    )
    for fused in (True, False):
        ours.fused = fused
        got = ours(x, key_padding_mask=pad, is_causal=causal)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    _, w = ours(x, key_padding_mask=pad, is_causal=causal, need_weights=True)
    torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-5)


def build64(variant: str, **options: object) -> pba.StandardAttention:
    """A float64 layer whose biases (``wa_bias`` too) are random, so that every weight matters."""
    layer = pba.make_attention(variant, D, H, context_length=L, dtype=torch.float64, **options)
    for name, p in layer.named_parameters():
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.5)
    return layer.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_reference_equals_torch_multihead_attention(bias: bool) -> None:
    """The reference itself, checked against torch: it is right for standard attention."""
    mha = nn.MultiheadAttention(D, H, bias=bias, batch_first=True, dtype=torch.float64)
    if bias:
        nn.init.normal_(mha.in_proj_bias, std=0.5)
        nn.init.normal_(mha.out_proj.bias, std=0.5)
    mha.eval()
    x = torch.randn(3, L, D, dtype=torch.float64)
    pad = right_padding_mask([L, 5, 1], L)
    expected = mha(x, x, x, key_padding_mask=pad, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))[0]
    got = reference_attention(pba.from_torch(mha).eval(), "standard", x, key_padding_mask=pad, is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


# Causal needs a key-axis softmax (an error otherwise, tested below); so does the fused path.
REFERENCE_CASES = [
    (variant, options, masks, fused)
    for variant, options in variant_options()
    for masks in ("none", "padding", "causal", "both")
    for fused in (True, False)
    if options.get("softmax_over") != "queries" or (masks in ("none", "padding") and not fused)
]


@pytest.mark.parametrize(("variant", "options", "masks", "fused"), REFERENCE_CASES)
def test_layers_equal_the_per_head_reference(variant: str, options: dict, masks: str, fused: bool) -> None:
    """Every variant and option against tests/reference_attention.py (one head at a time, from the paper)."""
    causal = masks in ("causal", "both")
    layer = build64(variant, fused=fused, **options)
    x = torch.randn(4, L, D, dtype=torch.float64)
    pad = right_padding_mask([L, 6, 3, 0], L) if masks in ("padding", "both") else None
    got = layer(x, key_padding_mask=pad, is_causal=causal)
    expected = reference_attention(layer, variant, x, key_padding_mask=pad, is_causal=causal)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("variant", "options"), variant_options())
def test_cross_attention_equals_the_per_head_reference(variant: str, options: dict) -> None:
    layer = build64(variant, **options)
    q, kv = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, L - 2, D, dtype=torch.float64)
    pad = right_padding_mask([L - 2, 4], L - 2)
    got = layer(q, kv, key_padding_mask=pad)
    torch.testing.assert_close(got, reference_attention(layer, variant, q, kv, key_padding_mask=pad), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_padded_tokens_never_reaches_real_tokens(variant: str, options: dict, causal: bool) -> None:
    """NaN and inf in padded tokens: both paths give the reference's finite outputs at real tokens."""
    layer = build64(variant, **options)
    x = torch.randn(3, L, D, dtype=torch.float64)
    pad = right_padding_mask([L, 5, 2], L)
    poisoned = x.clone()
    poisoned[1, 5:] = float("nan")
    poisoned[2, 2:] = float("inf")
    expected = reference_attention(layer, variant, x, key_padding_mask=pad, is_causal=causal)
    for fused in (True, False):
        layer.fused = fused
        got = layer(poisoned, key_padding_mask=pad, is_causal=causal)
        real = ~pad
        assert got[real].isfinite().all(), f"fused={fused}"
        torch.testing.assert_close(got[real], expected[real], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX_CASES)  # the kernel's softmax is over keys
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
def test_explicit_equals_fused(variant: str, options: dict, masks: str) -> None:
    layer = build(variant, **options).eval()
    x = torch.randn(4, L, D)
    pad = right_padding_mask([L, 6, 3, 0], L) if masks in ("padding", "both") else None
    causal = masks in ("causal", "both")
    layer.fused = True
    fused = layer(x, key_padding_mask=pad, is_causal=causal)
    layer.fused = False
    explicit = layer(x, key_padding_mask=pad, is_causal=causal)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_fused_path_is_the_default_and_weights_force_explicit(variant: str, monkeypatch) -> None:
    layer = build(variant)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    x = torch.randn(2, L, D)
    layer(x)
    assert calls == [1]
    layer(x, need_weights=True)
    layer.softmax_over = "queries"
    layer(x)
    assert calls == [1]


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(("variant", "options"), variant_options())
@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck(variant: str, options: dict, fused: bool) -> None:
    f, inputs = as_function_of_inputs(variant, options, fused)
    assert torch.autograd.gradcheck(f, inputs)


def as_function_of_inputs(variant: str, options: dict, fused: bool) -> tuple:
    """A small float64 layer as a function of its input and parameters, with padding (and causal
    masking where the softmax allows it), and a point to check derivatives at."""
    layer = pba.make_attention(variant, 4, 2, context_length=3, dtype=torch.float64, fused=fused, **options)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    pad = right_padding_mask([3, 2], 3)
    causal = options.get("softmax_over") != "queries"

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        named = dict(zip([n for n, _ in layer.named_parameters()], params))
        return torch.func.functional_call(layer, named, (x,), {"key_padding_mask": pad, "is_causal": causal})

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    return f, (x, *params)


@pytest.mark.parametrize(
    ("variant", "options"),
    [(v, {}) for v in pba.VARIANTS]
    + [("standard", {"softmax_over": "queries"}), ("super", {"wa_sharing": "head", "wa_bias": True, "bias": False})],
)
def test_explicit_path_has_second_derivatives(variant: str, options: dict) -> None:
    """``fused=False`` supports double backward (the class docstring says so), masks included."""
    f, inputs = as_function_of_inputs(variant, options, fused=False)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)  # random directions: cheap


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_fused_path_on_cpu_has_no_second_derivative(variant: str) -> None:
    """What the class docstring documents: torch's CPU attention kernel has no double backward.

    If this starts to fail, torch has added it: update ``StandardAttention``'s docstring.
    """
    layer = pba.make_attention(variant, 4, 2, context_length=3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for .*scaled_dot_product.* is not implemented"):
        grad.square().sum().backward()
    layer.fused = False
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- masks
@pytest.mark.parametrize(("variant", "options"), variant_options())
def test_causality(variant: str, options: dict) -> None:
    if options.get("softmax_over") == "queries":
        with pytest.raises(ValueError, match="is_causal=True needs softmax_over='keys'"):
            build(variant, **options)(torch.randn(1, L, D), is_causal=True)
        return
    layer = build(variant, **options).eval()
    x = torch.randn(2, L, D)
    base = layer(x, is_causal=True)
    for t in range(L - 1):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(2, L - t - 1, D) * 10
        out = layer(changed, is_causal=True)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_upper_triangular_wa_leaks() -> None:
    """The published "upper-triangular W^A" recipe lets early tokens read later ones."""
    layer = build("super").eval()
    with torch.no_grad():
        layer.wa_weight.copy_(torch.randn(L, L).triu())  # what the recipe trains
    x = torch.randn(1, L, D)
    changed = x.clone()
    changed[:, -1] += 5.0
    # Undo our lower-triangular guard to see what the recipe computes: W^A as given, causal scores.
    layer.effective_wa = lambda length, is_causal=False: layer.wa_weight[:length, :length]
    leak = (layer(changed, is_causal=True) - layer(x, is_causal=True))[:, 0].abs().max()
    assert leak > 1e-3
    del layer.effective_wa  # back to the class's method: lower-triangular when causal
    safe = (layer(changed, is_causal=True) - layer(x, is_causal=True))[:, 0].abs().max()
    assert safe == 0


# A query-axis softmax normalises over padded queries too, so it is not padding-invariant (documented).
@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX_CASES)
def test_padding_invariance(variant: str, options: dict) -> None:
    layer = build(variant, **options).eval()
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 5, 2], L)
    base = layer(x, key_padding_mask=pad)
    real = ~pad
    noisy = torch.where(real[..., None], x, torch.randn_like(x) * 100)
    out = layer(noisy, key_padding_mask=pad)
    torch.testing.assert_close(out[real], base[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"wa_sharing": "head"}, {"wa_bias": True}])
def test_super_short_input_equals_padded_masked(options: dict) -> None:
    layer = build("super", **options).eval()
    short = torch.randn(2, 5, D)
    padded = torch.cat([short, torch.randn(2, L - 5, D)], dim=1)
    pad = right_padding_mask([5, 5], L)
    for causal in (False, True):
        expected = layer(padded, key_padding_mask=pad, is_causal=causal)[:, :5]
        torch.testing.assert_close(layer(short, is_causal=causal), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("softmax_over", ["keys", "queries"])
def test_fully_masked_rows_give_output_bias_not_nan(variant: str, softmax_over: str) -> None:
    layer = build(variant, softmax_over=softmax_over).eval()
    x = torch.randn(2, L, D, requires_grad=True)
    pad = right_padding_mask([0, 4], L)
    out, w = layer(x, key_padding_mask=pad, need_weights=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0], layer.out_proj.bias.expand(L, D))
    assert (w[0] == 0).all()
    out.sum().backward()
    assert not x.grad.isnan().any()
    if softmax_over == "keys":
        layer.fused = True
        torch.testing.assert_close(layer(x, key_padding_mask=pad), out)


# ------------------------------------------------------------------------------- the paper's algebra
@pytest.mark.parametrize("variant", ["optimised", "efficient"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_head_merge_is_exact(variant: str, bias: bool) -> None:
    std = pba.StandardAttention(D, 1, bias=bias)
    for p in std.parameters():
        nn.init.normal_(p, std=0.3)
    merged = merge_projections(std, variant)
    assert type(merged).__name__.lower().startswith(variant)
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 6, 3], L)
    for kwargs in ({}, {"key_padding_mask": pad}, {"is_causal": True}):
        torch.testing.assert_close(merged(x, **kwargs), std(x, **kwargs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["optimised", "efficient"])
def test_many_head_merge_is_not_exact(variant: str) -> None:
    std = pba.StandardAttention(D, H)
    merged = merge_projections(std, variant)
    x = torch.randn(3, L, D)
    gap = (merged(x) - std(x)).abs().max()
    assert gap > 1e-2


def test_merge_needs_key_axis_softmax_for_biases() -> None:
    """Under a query-axis softmax the key bias no longer cancels: the merge stops being exact."""
    std = pba.StandardAttention(D, 1, softmax_over="queries")
    for p in std.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, L, D)
    assert (merge_projections(std, "efficient")(x) - std(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fused_path(variant: str, dtype: torch.dtype) -> None:
    layer = build(variant)
    x = torch.randn(2, L, D)
    expected = layer(x)
    low = layer.to(dtype)
    got = low(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_cuda_matches_cpu(variant: str) -> None:
    layer = build(variant).eval()
    x = torch.randn(2, L, D)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(d_model=10, n_heads=4), ValueError, r"d_model must be divisible by n_heads, got d_model=10, n_heads=4"),
        (dict(d_model=0, n_heads=1), ValueError, r"d_model must be a positive int, got 0"),
        (dict(d_model=8, n_heads=-2), ValueError, r"n_heads must be a positive int, got -2"),
        (dict(d_model=8.0, n_heads=2), TypeError, r"d_model must be an int, got float"),
        (dict(d_model=8, n_heads=2, softmax_over="rows"), ValueError, r"softmax_over must be one of \('keys', 'queries'\), got 'rows'"),
        (dict(d_model=8, n_heads=2, dropout=1.5), ValueError, r"dropout must be a float in \[0, 1\), got 1.5"),
    ],
)
def test_bad_construction(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        pba.StandardAttention(**kwargs)


def test_bad_super_construction() -> None:
    with pytest.raises(ValueError, match="needs context_length"):
        pba.make_attention("super", 8, 2)
    with pytest.raises(ValueError, match=r"context_length must be a positive int, got 0"):
        pba.make_attention("super", 8, 2, context_length=0)
    with pytest.raises(ValueError, match=r"wa_sharing must be one of \('layer', 'head'\), got 'token'"):
        pba.make_attention("super", 8, 2, context_length=4, wa_sharing="token")
    with pytest.raises(ValueError, match=r"only apply to variant 'super'"):
        pba.make_attention("efficient", 8, 2, wa_bias=True)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_bad_forward_inputs(variant: str) -> None:
    layer = build(variant)
    x = torch.randn(2, L, D)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, length, d_model=16\) or unbatched \(length, d_model=16\), got \(2, 8\)"):
        layer(torch.randn(2, L))
    with pytest.raises(ValueError, match=r"key must have shape \(length, d_model=16\), as query is unbatched, got \(2, 8, 16\)"):
        layer(x[0], x)
    with pytest.raises(ValueError, match=r"key must have shape \(batch, length, d_model=16\), got \(2, 8, 12\)"):
        layer(x, torch.randn(2, L, 12))
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, L, D, dtype=torch.long))
    with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
        layer([[1.0] * D])
    with pytest.raises(ValueError, match=r"must share the batch size, got 2, 3, 3"):
        layer(x, torch.randn(3, L, D))
    with pytest.raises(ValueError, match=r"key and value must have the same length, got 8 and 7"):
        layer(x, x, torch.randn(2, L - 1, D))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(True = padding, as in torch.nn.MultiheadAttention\) or a float tensor added to the scores, got torch.int64"):
        layer(x, key_padding_mask=torch.ones(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, L_k\) = \(2, 8\), got \(2, 7\)"):
        layer(x, key_padding_mask=torch.ones(2, L - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"is_causal=True needs L_q <= L_k \(the queries are the last L_q of the keys' positions\), got L_q=8, L_k=5"):
        layer(x, x[:, :5], is_causal=True)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_input_dtype_must_match_the_layer(variant: str) -> None:
    layer = build(variant)  # float32
    x = torch.randn(2, L, D)
    with pytest.raises(TypeError, match=r"query has dtype torch.float64 but the layer's parameters have dtype torch.float32"):
        layer(x.double())
    with pytest.raises(TypeError, match=r"value has dtype torch.float16 but the layer's parameters have dtype torch.float32"):
        layer(x, x, x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: mixed dtypes are its job
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.1)


def test_super_rejects_inputs_longer_than_context() -> None:
    layer = build("super")
    with pytest.raises(ValueError, match=r"at most context_length=8 keys, got L_k=9"):
        layer(torch.randn(1, L + 1, D))
