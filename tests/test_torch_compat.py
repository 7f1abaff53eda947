"""The layers as a PyTorch user meets them: torch's mask meanings, attn_mask, decoding, initialisation,
conversion to and from nn.MultiheadAttention, autocast, export, tracing, forward-mode AD, compile."""

from __future__ import annotations

import importlib.resources
import io
import math
import warnings

import pytest
import torch
from torch import nn

import pba

from .reference_attention import reference_attention
from .test_attention import D, H, L, build, build64, right_padding_mask, variant_options

KEY_SOFTMAX = [(v, o) for v, o in variant_options() if o.get("softmax_over") != "queries"]


# ------------------------------------------------------------------------------- masks
def test_an_all_false_torch_padding_mask_is_no_mask() -> None:
    """Regression: a mask written the torch way (True = padding) once meant "every token is padding"."""
    for variant in pba.VARIANTS:
        layer = build(variant).eval()
        x = torch.randn(2, L, D)
        no_padding = torch.zeros(2, L, dtype=torch.bool)
        out = layer(x, key_padding_mask=no_padding)
        torch.testing.assert_close(out, layer(x))
        assert not torch.allclose(out, layer.out_proj.bias.expand_as(out))


def random_attn_mask(kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A mask of torch's meaning: bool True = forbidden; float added (-inf = forbidden)."""
    forbidden = torch.rand(shape) < 0.3
    if kind == "bool":
        return forbidden
    added = torch.randn(shape, dtype=torch.float64)
    return added.masked_fill(forbidden, float("-inf"))


@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("fused", [True, False])
def test_attn_mask_equals_the_reference(variant: str, options: dict, kind: str, fused: bool) -> None:
    torch.manual_seed(0)
    layer = build64(variant, fused=fused, **options)
    x = torch.randn(3, L, D, dtype=torch.float64)
    pad = right_padding_mask([L, 6, 3], L)
    mask = random_attn_mask(kind, (L, L))
    mask[0] = True if kind == "bool" else float("-inf")  # query 0 may read nothing: output b^O
    for causal in (False, True):
        got = layer(x, key_padding_mask=pad, attn_mask=mask, is_causal=causal)
        expected = reference_attention(layer, variant, x, key_padding_mask=pad, attn_mask=mask, is_causal=causal)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    # (B, h, L_q, L_k): head i of item b is masked by per_head[b, i], as if that 2-D mask were given.
    per_head = random_attn_mask(kind, (3, H, L, L))
    _, weights = layer(x, attn_mask=per_head, need_weights=True)
    for b in range(3):
        for i in range(H):
            _, alone = layer(x[b : b + 1], attn_mask=per_head[b, i], need_weights=True)
            torch.testing.assert_close(weights[b, i], alone[0, i])


@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX)
def test_causal_decoding_equals_the_last_rows(variant: str, options: dict) -> None:
    """``L_q < L_k`` with ``is_causal``: the queries are the last positions (one-token decoding)."""
    layer = build64(variant, **options)
    x = torch.randn(2, L, D, dtype=torch.float64)
    full = layer(x, is_causal=True)
    for fused in (True, False):
        layer.fused = fused
        for last in (1, 3):
            got = layer(x[:, -last:], x, is_causal=True)
            torch.testing.assert_close(got, full[:, -last:], atol=1e-12, rtol=1e-10)
            expected = reference_attention(layer, variant, x[:, -last:], x, is_causal=True)
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_super_attn_mask_alone_does_not_make_wa_causal() -> None:
    """What the docstring says: a causal attn_mask restricts scores; only is_causal makes W^A triangular."""
    layer = build64("super")
    x = torch.randn(1, L, D, dtype=torch.float64)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    changed = x.clone()
    changed[0, -1] += 1.0  # change the last token only
    by_mask = layer(changed, attn_mask=future)[0, 0] - layer(x, attn_mask=future)[0, 0]
    by_flag = layer(changed, is_causal=True)[0, 0] - layer(x, is_causal=True)[0, 0]
    assert by_mask.abs().max() > 1e-6  # token 0 reads token L-1 through W^A
    assert by_flag.abs().max() == 0


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_unbatched_input_is_a_batch_of_one(variant: str) -> None:
    layer = build(variant).eval()
    x = torch.randn(L, D)
    pad = torch.zeros(L, dtype=torch.bool)
    pad[5:] = True
    out, w = layer(x, key_padding_mask=pad, need_weights=True)
    out1, w1 = layer(x[None], key_padding_mask=pad[None], need_weights=True)
    assert out.shape == (L, D) and w.shape == (H, L, L)
    torch.testing.assert_close(out, out1[0])
    torch.testing.assert_close(w, w1[0])


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_bad_masks_are_named(variant: str) -> None:
    layer = build(variant)
    x = torch.randn(2, L, D)
    with pytest.raises(TypeError, match=r"attn_mask must be a bool tensor \(True = forbidden pair.*got torch.int64"):
        layer(x, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask must be \(L_q, L_k\) or broadcastable to \(batch, n_heads, L_q, L_k\) = \(2, 4, 8, 8\), got \(8, 7\)"):
        layer(x, attn_mask=torch.zeros(L, L - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(8,\)"):
        layer(x, attn_mask=torch.zeros(L, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(3, 1, 8, 8\)"):
        layer(x, attn_mask=torch.zeros(3, 1, L, L, dtype=torch.bool))


@pytest.mark.parametrize(("variant", "options"), KEY_SOFTMAX)
def test_fused_path_with_per_head_masks_equals_explicit(variant: str, options: dict) -> None:
    layer = build64(variant, **options)
    x = torch.randn(3, L, D, dtype=torch.float64)
    float_pad = torch.zeros(3, L, dtype=torch.float64).masked_fill(right_padding_mask([L, 5, 0], L), float("-inf"))
    for kind in ("bool", "float"):
        mask = random_attn_mask(kind, (3, H, L, L))
        fused = layer(x, key_padding_mask=float_pad, attn_mask=mask, is_causal=True)
        layer.fused = False
        explicit = layer(x, key_padding_mask=float_pad, attn_mask=mask, is_causal=True)
        layer.fused = True
        torch.testing.assert_close(fused, explicit, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_float_padding_mask_equals_bool(variant: str) -> None:
    """``-inf`` in a float key_padding_mask is padding (zeroed before W^A too), as a bool ``True``."""
    layer = build(variant).eval()
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 5, 2], L)
    as_float = torch.zeros(3, L, dtype=torch.float64).masked_fill(pad, float("-inf"))  # another dtype
    for fused in (True, False):
        layer.fused = fused
        torch.testing.assert_close(layer(x, key_padding_mask=as_float), layer(x, key_padding_mask=pad))
        unbatched_mask = torch.zeros(L, L, dtype=torch.bool).triu(1)
        torch.testing.assert_close(layer(x[1], attn_mask=unbatched_mask), layer(x[1:2], attn_mask=unbatched_mask)[0])


def test_three_dimensional_attn_mask_is_refused() -> None:
    layer = build("standard")
    x = torch.randn(4, L, D)  # batch == n_heads: a (B, L, L) mask would pass as (h, L, L)
    with pytest.raises(ValueError, match=r"a 3-D mask is ambiguous"):
        layer(x, attn_mask=torch.zeros(4, L, L, dtype=torch.bool))


def test_export_cross_attention_with_separate_lengths() -> None:
    """Query and key lengths as two dynamic dimensions, equal or not (prefill and decoding)."""
    from torch.export import Dim, export

    class Decode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = build("super")

        def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return self.layer(q, kv, is_causal=True)

    model = Decode().eval()
    q_len, kv_len = Dim("q_len", min=1, max=L), Dim("kv_len", min=2, max=L)
    program = export(model, (torch.randn(2, 3, D), torch.randn(2, L, D)), dynamic_shapes=({1: q_len}, {1: kv_len}))
    for lq, lk in ((3, L), (L, L), (1, 5)):
        q, kv = torch.randn(2, lq, D), torch.randn(2, lk, D)
        torch.testing.assert_close(program.module()(q, kv), model(q, kv), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- initialisation
def test_construction_keeps_its_random_stream() -> None:
    """Seeded construction: nn.Linear's draws for each learned map, then Xavier for the input maps, then W^A.

    Every seeded result in the book was made with this stream; written out here with plain torch.
    """
    for variant, maps in (("standard", 4), ("super", 2)):  # q, k, v, o / q, o
        torch.manual_seed(3)
        layer = pba.make_attention(variant, D, H, context_length=L)
        torch.manual_seed(3)
        linears = [nn.Linear(D, D) for _ in range(maps)]
        for lin in linears[:-1]:
            nn.init.xavier_uniform_(lin.weight)
        wa = torch.empty(L, L)
        nn.init.xavier_uniform_(wa)
        torch.testing.assert_close(layer.q_proj.weight, linears[0].weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.out_proj.weight, linears[-1].weight, rtol=0, atol=0)
        if variant == "standard":
            torch.testing.assert_close(layer.v_proj.weight, linears[2].weight, rtol=0, atol=0)
        else:
            torch.testing.assert_close(layer.wa_weight, wa, rtol=0, atol=0)
        assert layer.q_proj.bias.abs().sum() == 0 and layer.out_proj.bias.abs().sum() == 0


def check_layer_initialisation(layer: pba.StandardAttention) -> None:
    d = layer.d_model
    xavier = math.sqrt(6 / (d + d))
    kaiming = 1 / math.sqrt(d)  # nn.Linear's default weight bound
    for name, module in layer.named_children():
        if name == "out_proj":
            assert module.weight.abs().max() <= kaiming
        else:
            assert module.weight.abs().max() <= xavier
            assert module.weight.abs().max() > kaiming  # not nn.Linear's default (xavier's bound is wider here)
        assert module.bias is None or module.bias.abs().sum() == 0
    if isinstance(layer, pba.SuperAttention):
        l = layer.context_length
        assert layer.wa_weight.isfinite().all() and 0 < layer.wa_weight.abs().max() <= math.sqrt(6 / (l + l))
        assert layer.wa_bias is None or layer.wa_bias.abs().sum() == 0


@pytest.mark.parametrize("order", ["modules", "apply", "layer"])
@pytest.mark.parametrize(("variant", "options"), [(v, {}) for v in pba.VARIANTS] + [("super", {"wa_bias": True, "wa_sharing": "head"})])
def test_meta_device_then_reset_parameters(variant: str, options: dict, order: str) -> None:
    """Regression: after ``to_empty`` W^A was uninitialised memory and the projections nn.Linear's."""
    with torch.device("meta"):
        model = nn.Sequential(pba.make_attention(variant, 64, 4, context_length=16, **options), nn.LayerNorm(64))
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))  # what uninitialised memory may hold
    if order == "modules":  # parents before children
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    elif order == "apply":  # children before parents
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    else:
        model[0].reset_parameters()
        model[1].reset_parameters()
    check_layer_initialisation(model[0])
    assert model(torch.randn(2, 16, 64)).isfinite().all()


# ------------------------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("variant", ["standard", "optimised", "efficient"])
@pytest.mark.parametrize("bias", [True, False])
def test_to_torch_computes_the_same(variant: str, bias: bool) -> None:
    layer = build(variant, bias=bias, dropout=0.1).eval()
    mha = pba.to_torch(layer).eval()
    assert isinstance(mha, nn.MultiheadAttention) and mha.batch_first and mha.dropout == 0.1
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 5, 2], L)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    expected = layer(x, key_padding_mask=pad, attn_mask=causal)
    got = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    seq_first = pba.to_torch(layer, batch_first=False).eval()
    xt = x.transpose(0, 1)
    got = seq_first(xt, xt, xt, key_padding_mask=pad, need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(got, layer(x, key_padding_mask=pad), atol=1e-6, rtol=1e-5)


def test_from_torch_and_back_is_the_identity() -> None:
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    nn.init.normal_(mha.in_proj_bias)
    assert not pba.from_torch(mha).training and pba.from_torch(mha.train()).training  # mode kept
    back = pba.to_torch(pba.from_torch(mha))
    for name, tensor in mha.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0)


def test_conversions_refuse_what_they_cannot_represent() -> None:
    with pytest.raises(ValueError, match="mha must have add_bias_kv=False"):
        pba.from_torch(nn.MultiheadAttention(D, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="mha must have add_zero_attn=False"):
        pba.from_torch(nn.MultiheadAttention(D, H, add_zero_attn=True))
    with pytest.raises(ValueError, match=r"kdim == vdim == embed_dim.*got embed_dim=16, kdim=8, vdim=16"):
        pba.from_torch(nn.MultiheadAttention(D, H, kdim=8))
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention, got Linear"):
        pba.from_torch(nn.Linear(D, D))
    with pytest.raises(ValueError, match="got SuperAttention: its W\\^A mixes value rows"):
        pba.to_torch(build("super"))
    with pytest.raises(ValueError, match="softmax_over='keys'"):
        pba.to_torch(build("standard", softmax_over="queries"))


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_adapter_inside_transformer_encoder_layer(variant: str, batch_first: bool) -> None:
    """The recipe in pba.interop: a pba layer as nn.TransformerEncoderLayer's self_attn."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(D, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    reference = None
    if variant == "standard":  # then the stock layer, converted, must compute what it computed
        reference = nn.TransformerEncoderLayer(D, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        reference.load_state_dict(enc.state_dict())
        enc.self_attn = pba.MultiheadAttentionAdapter(pba.from_torch(enc.self_attn), batch_first=batch_first)
    else:
        enc.self_attn = pba.MultiheadAttentionAdapter(
            pba.make_attention(variant, D, H, context_length=L), batch_first=batch_first
        )
    x = torch.randn(3, L, D)
    pad = right_padding_mask([L, 5, 2], L)
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # float: 0 and -inf
    src = x if batch_first else x.transpose(0, 1)
    float_pad = torch.zeros(3, L).masked_fill(pad, float("-inf"))
    for mode in ("train", "eval"):
        getattr(enc, mode)()
        out = enc(src, src_mask=causal, src_key_padding_mask=float_pad, is_causal=True)
        assert out.shape == src.shape and out.isfinite().all()
        if mode == "eval":  # the block's attention is the pba layer, called on the block's input
            attended = enc.self_attn.layer(x, key_padding_mask=pad, is_causal=True)
            expected = enc.norm2(enc.norm1(x + attended) + enc._ff_block(enc.norm1(x + attended)))
            torch.testing.assert_close(out if batch_first else out.transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
        else:
            out.sum().backward()
        if reference is not None:
            getattr(reference, mode)()
            expected = reference(src, src_mask=causal, src_key_padding_mask=float_pad, is_causal=True)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert enc.self_attn.layer.q_proj.weight.grad is not None


def test_adapter_speaks_torch() -> None:
    """Return value, weight averaging and torch's (B * h, L_q, L_k) attn_mask, as nn.MultiheadAttention."""
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    adapter = pba.MultiheadAttentionAdapter(pba.from_torch(mha), batch_first=True).eval()
    x = torch.randn(2, L, D)
    mask = torch.rand(2 * H, L, L) < 0.3
    mask[:, :, 0] = False  # every query may read key 0
    for average in (True, False):
        got = adapter(x, x, x, attn_mask=mask, average_attn_weights=average)
        expected = mha(x, x, x, attn_mask=mask, average_attn_weights=average)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    out, weights = adapter(x, x, x, need_weights=False)
    assert weights is None and out.shape == x.shape
    with pytest.raises(TypeError, match="layer must be a pba attention layer, got MultiheadAttention"):
        pba.MultiheadAttentionAdapter(mha, batch_first=True)


# ------------------------------------------------------------------------------- torch machinery
class CausalSelf(nn.Module):
    """``layer(x, is_causal=True)`` as a module of one tensor argument, for export and tracing."""

    def __init__(self, layer: pba.StandardAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, is_causal=True)


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(variant: str, dtype: torch.dtype) -> None:
    """Regression: super failed in backward under autocast (a custom autograd Function)."""
    layer = build(variant)
    x = torch.randn(2, L, D, requires_grad=True)
    pad = right_padding_mask([L, 5], L)
    for kwargs in ({}, {"is_causal": True}, {"key_padding_mask": pad}):
        with torch.autocast("cpu", dtype=dtype):
            out = layer(x, **kwargs)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        assert x.grad.isfinite().all() and all(p.grad.dtype == torch.float32 for p in layer.parameters())
        torch.testing.assert_close(out.float(), layer(x, **kwargs), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_export_with_dynamic_batch_and_length_up_to_context(variant: str) -> None:
    """Regression: super's export failed whenever the length range reached context_length."""
    from torch.export import Dim, export

    model = CausalSelf(build(variant)).eval()
    batch, length = Dim("batch", min=1, max=64), Dim("length", min=2, max=L)
    program = export(model, (torch.randn(3, L, D),), dynamic_shapes=({0: batch, 1: length},))
    for shape in ((3, L), (5, 3), (1, L)):
        y = torch.randn(*shape, D)
        torch.testing.assert_close(program.module()(y), model(y), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_jit_trace_saves_and_loads_without_tracer_warnings(variant: str) -> None:
    """Regression: a traced super could not be saved (custom autograd Function); the checks warned."""
    model = CausalSelf(build(variant)).eval()
    x = torch.randn(2, L, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates jit.trace itself
        traced = torch.jit.trace(model, (x,))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_forward_mode_ad_on_the_explicit_path(variant: str) -> None:
    """Regression: torch.func.jvp failed for super even with fused=False. Checked against finite differences."""
    layer = build64(variant, fused=False)
    params = dict(layer.named_parameters())
    x = torch.randn(2, L, D, dtype=torch.float64)
    tangent = torch.randn_like(x)
    pad = right_padding_mask([L, 5], L)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, params, (x,), {"is_causal": True, "key_padding_mask": pad})

    _, jvp = torch.func.jvp(f, (x,), (tangent,))
    eps = 1e-6
    finite = (f(x + eps * tangent) - f(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp, finite, atol=1e-6, rtol=1e-5)


def test_fused_path_on_cpu_has_no_forward_mode() -> None:
    """What the class docstring documents. If this starts to fail, torch has added it: update the docstring."""
    layer = build("standard")
    params = dict(layer.named_parameters())
    x = torch.randn(2, L, D)
    f = lambda x: torch.func.functional_call(layer, params, (x,))  # noqa: E731
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(f, (x,), (torch.randn_like(x),))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the documented way round with fused=True
        _, tangent = torch.func.jvp(f, (x,), (torch.randn_like(x),))
    assert tangent.shape == x.shape and tangent.isfinite().all() and tangent.abs().sum() > 0


@pytest.mark.parametrize("variant", pba.VARIANTS)
def test_compile_in_one_graph_with_dynamic_shapes(variant: str) -> None:
    """torch.compile's graph capture (``fullgraph``) with a dynamic batch and length; aot_eager keeps it fast."""
    torch._dynamo.reset()
    layer = build(variant)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for length in (L, 5):
        x = torch.randn(3, length, D, requires_grad=True)
        pad = right_padding_mask([length, 2, 1], length)
        out = compiled(x, key_padding_mask=pad, is_causal=True)
        torch.testing.assert_close(out, layer(x, key_padding_mask=pad, is_causal=True))
        out.sum().backward()
        assert x.grad.isfinite().all()


def test_package_ships_type_hints() -> None:
    assert importlib.resources.files("pba").joinpath("py.typed").is_file()
