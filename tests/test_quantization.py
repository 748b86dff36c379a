"""Token encode/decode (schemas/quantization.py): exactness and error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edje_indexer.schemas import quantization as q

magnitudes = st.floats(min_value=1e-3, max_value=1e3) | st.just(0.0)
values = st.floats(min_value=-1.0, max_value=1.0, width=32)


@st.composite
def token_batches(draw):
    """[b, m, d] float32 tokens whose rows have very different scales (and some all-zero rows)."""
    b, m, d = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 48))
    x = draw(arrays(np.float32, (b, m, d), elements=values))
    scale = draw(arrays(np.float32, (b, m, 1), elements=magnitudes))
    return x * scale


@settings(max_examples=200, deadline=None)
@given(token_batches())
def test_fp16_round_trip_is_exact(x):
    stored, scales = q.quantize(torch.from_numpy(x), "fp16")
    assert scales is None and stored.dtype == torch.float16
    back = q.dequantize(stored.numpy(), None, "fp16")
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))


@settings(max_examples=300, deadline=None)
@given(token_batches())
def test_int8_error_is_bounded_per_token(x):
    stored, scales = q.quantize(torch.from_numpy(x), "int8")
    assert stored.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == x.shape[:-1]
    s, v = scales.numpy().astype(np.float32), stored.numpy()
    assert (np.abs(v.astype(np.int32)) <= 127).all()
    back = q.dequantize(v, scales.numpy(), "int8")
    amax = np.abs(x).max(axis=-1, keepdims=True)
    # half a quantization step (float32 arithmetic adds a hair)
    assert (s[..., None] * 127 >= amax * (1 - 1e-6)).all()  # the scale covers the token's range
    bound = s[..., None] * 0.5 * (1 + 1e-5) + 1e-9
    assert (np.abs(back - x) <= bound).all()
    # and relative to the token's own range, the error is small
    assert (np.abs(back - x) <= amax / 127 + 1e-6).all()


@settings(max_examples=50, deadline=None)
@given(token_batches(), st.sampled_from(q.QUANTIZATIONS))
def test_numpy_and_torch_decoders_agree(x, name):
    stored, scales = q.quantize(torch.from_numpy(x), name)
    a = q.dequantize(stored.numpy(), None if scales is None else scales.numpy(), name)
    b = q.dequantize_torch(stored, scales, name).numpy()
    np.testing.assert_array_equal(a, b)


def test_zero_token_and_bytes_per_image():
    x = torch.zeros(1, 2, 5)
    x[0, 1] = torch.tensor([1.0, -2.0, 0.5, 0.0, 2.0])
    v, s = q.quantize(x, "int8")
    assert v[0, 0].abs().sum() == 0 and s[0, 0] == 0
    # scale = fp16 just above 2/127, so 1.0 lands at 63.49 -> 63
    assert v[0, 1].tolist() == [63, -127, 32, 0, 127]
    assert q.bytes_per_image("fp16", 64, 384) == 49_152
    assert q.bytes_per_image("int8", 64, 384) == 24_704


def test_unknown_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        q.quantize(torch.zeros(1, 1, 1), "int4")


def test_int8_scale_covers_a_token_of_float32_denormals():
    """max|x| / 127 underflows to 0 in float32 for denormal tokens; the scale must still cover them."""
    x = torch.full((1, 2, 8), 1e-45)
    stored, scales = q.quantize(x, "int8")
    assert (scales.float() * 127 >= x.abs().amax(-1)).all() and (scales > 0).all()
