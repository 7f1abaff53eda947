"""Parameter and multiply-add formulas against real modules and the paper's numbers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import pba
from pba import costs


def test_imdb_counts_exactly() -> None:
    expected = {"standard": 4224, "optimised": 3168, "efficient": 2112, "super": 3136}
    for variant, count in expected.items():
        layer = pba.make_attention(variant, 32, 4, context_length=32)
        assert costs.count_parameters(layer) == count
        assert costs.parameter_count(variant, 32, n_heads=4, context_length=32) == count
    with_bias = pba.make_attention("super", 32, 4, context_length=32, wa_bias=True)
    assert costs.count_parameters(with_bias) == 3168
    assert costs.parameter_count("super", 32, n_heads=4, context_length=32, wa_bias=True) == 3168


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(pba.VARIANTS),
    n_heads=st.integers(1, 4),
    d_k=st.integers(1, 6),
    context_length=st.integers(1, 12),
    bias=st.booleans(),
    wa_bias=st.booleans(),
    wa_sharing=st.sampled_from(["layer", "head"]),
)
def test_parameter_formula_matches_modules(variant, n_heads, d_k, context_length, bias, wa_bias, wa_sharing):
    d_model = n_heads * d_k
    super_options = dict(wa_bias=wa_bias, wa_sharing=wa_sharing) if variant == "super" else {}
    layer = pba.make_attention(variant, d_model, n_heads, context_length=context_length, bias=bias, **super_options)
    assert costs.count_parameters(layer) == costs.parameter_count(
        variant, d_model, n_heads=n_heads, context_length=context_length, bias=bias, **super_options
    )


@pytest.mark.parametrize("variant", pba.VARIANTS)
@pytest.mark.parametrize(("d_model", "length"), [(32, 32), (64, 16), (16, 48)])
def test_mac_formula_matches_counted_flops(variant: str, d_model: int, length: int) -> None:
    """torch's FLOP counter (2 FLOPs per multiply-add) over the explicit path agrees."""
    layer = pba.make_attention(variant, d_model, 4, context_length=length, bias=False, fused=False)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, length, d_model))
    assert counter.get_total_flops() == 2 * costs.macs(variant, d_model, length)


def test_paper_ratios_at_l128_d512() -> None:
    base = costs.macs("standard", 512, 128)
    ratios = {v: round(costs.macs(v, 512, 128) / base, 2) for v in pba.VARIANTS}
    assert ratios == {"standard": 1.0, "optimised": 0.78, "efficient": 0.56, "super": 0.61}


def test_cross_attention_macs_by_hand() -> None:
    """4 queries, 6 keys, d = 8: W^Q, W^O act on the queries (4*8*8 = 256 each), W^K, W^V on the keys
    (6*8*8 = 384 each); scores and S V cost 4*6*8 = 192 each; super's W^A X costs 6*6*8 = 288."""
    expected = {
        "standard": 256 * 2 + 384 * 2 + 192 * 2,
        "optimised": 256 * 2 + 384 + 192 * 2,
        "efficient": 256 * 2 + 192 * 2,
        "super": 256 * 2 + 192 * 2 + 288,
    }
    assert {v: costs.macs(v, 8, 4, key_length=6) for v in pba.VARIANTS} == expected


def test_cost_errors() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        costs.parameter_count("linear", 8)
    with pytest.raises(ValueError, match="needs context_length"):
        costs.parameter_count("super", 8)
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        costs.macs("standard", 8, 0)
