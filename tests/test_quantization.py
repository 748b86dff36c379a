"""Token encode/decode (schemas/quantization.py): exactness and error bounds."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
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


@settings(max_examples=120, deadline=None)
@given(token_batches(), st.sampled_from(q.QUANTIZATIONS))
def test_numpy_and_torch_decoders_agree(x, name):
    assume(x.shape[-1] % 2 == 0 or not q.is_int4(name))  # int4 packs two values per byte
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
    assert q.bytes_per_image("int4", 64, 384) == q.bytes_per_image("int4-rht", 64, 384) == 64 * 192 + 128 == 12_416


def test_unknown_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        q.quantize(torch.zeros(1, 1, 1), "int3")


def test_int8_scale_covers_a_token_of_float32_denormals():
    """max|x| / 127 underflows to 0 in float32 for denormal tokens; the scale must still cover them."""
    x = torch.full((1, 2, 8), 1e-45)
    stored, scales = q.quantize(x, "int8")
    assert (scales.float() * 127 >= x.abs().amax(-1)).all() and (scales > 0).all()


# -- int4 and int4-rht ---------------------------------------------------------------------------------------

FP16_MAX = 65504.0
TINY = float(np.float32(1e-39))  # a float32 denormal


@st.composite
def int4_batches(draw):
    """[b, m, d] float32 tokens, d even, per-token scales over many orders of magnitude, and one token made
    odd: all zeros, float32 denormals, values up to float16's max, or one outlier among small values."""
    b, m, d = draw(st.integers(1, 3)), draw(st.integers(1, 6)), 2 * draw(st.integers(1, 40))
    x = draw(arrays(np.float32, (b, m, d), elements=values))
    token_scales = st.floats(float(np.float32(1e-30)), 1e4, width=32) | st.just(0.0)
    x = x * draw(arrays(np.float32, (b, m, 1), elements=token_scales))
    t = draw(st.integers(0, m - 1))
    kind = draw(st.sampled_from(["plain", "zero", "denormal", "huge", "outlier"]))
    if kind == "zero":
        x[:, t] = 0
    elif kind == "denormal":
        x[:, t] = draw(arrays(np.float32, d, elements=st.floats(-TINY, TINY, width=32)))
    elif kind == "huge":
        x[:, t] = draw(arrays(np.float32, d, elements=st.floats(-FP16_MAX, FP16_MAX, width=32)))
    elif kind == "outlier":
        x[:, t, draw(st.integers(0, d - 1))] = draw(st.floats(-6e4, 6e4, width=32))
    return x


def _smallest_covering_scale(scales: np.ndarray, amax: np.ndarray) -> None:
    """7 * scale covers max|x| (nothing clamps) and the next float16 down would not: the smallest such."""
    s = scales.astype(np.float64)
    assert (7 * s >= amax).all()
    below = np.nextafter(scales, np.float16(0)).astype(np.float64)
    assert ((s == 0) | (7 * below < amax)).all()
    assert ((s == 0) == (amax == 0)).all()


@settings(max_examples=400, deadline=None)
@given(int4_batches())
def test_int4_error_is_at_most_half_a_step_exactly(x):
    packed, scales = q.quantize(torch.from_numpy(x), "int4")
    assert packed.dtype == torch.uint8 and packed.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert scales.dtype == torch.float16 and scales.shape == x.shape[:-1]
    amax = np.abs(x).max(-1).astype(np.float64)
    _smallest_covering_scale(scales.numpy(), amax)
    nibbles = np.stack([packed.numpy() & 15, packed.numpy() >> 4], -1)
    assert ((nibbles >= 1) & (nibbles <= 15)).all()  # levels -7..7; nibble 0 (-8) is never written
    back = q.dequantize(packed.numpy(), scales.numpy(), "int4")
    # float64 holds x - back exactly (they are within a factor of 3 of each other, or back is 0)
    err = np.abs(x.astype(np.float64) - back.astype(np.float64))
    assert (err <= scales.numpy().astype(np.float64)[..., None] / 2).all()


@settings(max_examples=300, deadline=None)
@given(int4_batches())
def test_int4_rht_bound_holds_on_the_stored_values_and_through_the_rotation(x):
    xt = torch.from_numpy(x)
    packed, scales = q.quantize(xt, "int4-rht")
    y = q.rotate_torch(xt).numpy().astype(np.float64)
    amax = np.abs(y).max(-1)
    s = scales.numpy().astype(np.float64)
    # The rotation can grow a coordinate by up to sqrt(B): a token whose rotated max passes 7 * 65504 has no
    # float16 scale; the encoder rejects it as non-finite (near float16's max only).
    finite = np.isfinite(s)
    assert (amax[~finite] > 7 * FP16_MAX).all()
    assume(finite.any())
    _smallest_covering_scale(scales.numpy()[finite], amax[finite])
    levels = q.unpack_int4(packed.numpy()).astype(np.float64)
    assert (np.abs(y - levels * s[..., None]) <= s[..., None] / 2)[finite].all()  # exact, per stored value
    back = q.dequantize(packed.numpy(), scales.numpy(), "int4-rht").astype(np.float64)
    d, b = x.shape[-1], q.rotation_block(x.shape[-1])
    err = back - x
    # orthogonal: a token's L2 error is its rotated error's (<= sqrt(d) * s / 2), each value's at most
    # sqrt(B) * s / 2; plus float32 rounding of the rotation and of the decode's one multiply
    slack = 1e-6 * np.linalg.norm(x.astype(np.float64), axis=-1) + 1e-37
    assert (np.linalg.norm(err, axis=-1) <= np.sqrt(d) * s / 2 + slack)[finite].all()
    assert (np.abs(err) <= (np.sqrt(b) * s / 2 + slack)[..., None])[finite].all()


def test_int4_nibble_layout_and_packing_round_trip():
    levels = torch.arange(-7, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(levels, levels).to(torch.int8).reshape(1, 225, 2)  # every pair of levels
    packed = q.pack_int4_torch(pairs)
    assert packed.shape == (1, 225, 1) and packed.dtype == torch.uint8
    want = (pairs[..., 0].to(torch.int32) + 8) | ((pairs[..., 1].to(torch.int32) + 8) << 4)
    assert packed[..., 0].tolist() == want.tolist()  # value 2j: low nibble of byte j, 2j+1: high nibble
    np.testing.assert_array_equal(q.unpack_int4(packed.numpy()), pairs.numpy())
    assert torch.equal(q.unpack_int4_torch(packed), pairs)
    # a token on the grid: scale max|x| / 7 = 1, q = x, nibbles 1, 15, 8, 9
    v, s = q.quantize(torch.tensor([[[-7.0, 7.0, 0.0, 1.0]]]), "int4")
    assert s.item() == 1.0 and v.reshape(-1).tolist() == [0xF1, 0x98]
    np.testing.assert_array_equal(q.dequantize(v.numpy(), s.numpy(), "int4"), [[[-7.0, 7.0, 0.0, 1.0]]])


@pytest.mark.parametrize("name", ["int4", "int4-rht"])
def test_int4_edge_tokens(name):
    x = torch.zeros(1, 4, 384)
    x[0, 1] = 1e-45  # float32 denormals: max|x| / 7 is 0 in float32, the scale must still cover them
    x[0, 2] = torch.linspace(-FP16_MAX, FP16_MAX, 384) if name == "int4" else torch.linspace(-3e4, 3e4, 384)
    x[0, 3, 17] = 1000.0  # one outlier
    v, s = q.quantize(x, name)
    assert s[0, 0] == 0 and (v[0, 0] == 0x88).all()  # an all-zero token: scale 0, every q = 0
    assert s[0, 1] == torch.finfo(torch.float16).smallest_normal * 2.0**-10  # the smallest float16 > 0
    assert torch.isfinite(s).all()
    back = q.dequantize(v.numpy(), s.numpy(), name)
    assert (back[0, 0] == 0).all() and (back[0, 1] == 0).all()
    assert np.abs(back[0, 3] - x[0, 3].numpy()).max() <= np.sqrt(q.rotation_block(384)) * s[0, 3].item() / 2
    # past what a float16 scale can cover (7 * 65504): a non-finite scale, which the encoder rejects
    _, s = q.quantize(torch.full((1, 1, 8), 7 * FP16_MAX * 1.01), name)
    assert not torch.isfinite(s).all()


def test_int4_rht_spreads_an_outlier_and_undoes_the_rotation():
    """Tokens whose energy sits in one coordinate: the rotation spreads it over the block, so the grid
    fits the rest; decoding undoes it (a broken undo would make the error as large as the tokens)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((64, 64, 384), generator=g)
    x[torch.arange(64)[:, None], torch.arange(64)[None, :], torch.randint(0, 384, (64, 64), generator=g)] = 40.0
    errors = {}
    for name in ("int4", "int4-rht"):
        v, s = q.quantize(x, name)
        back = torch.from_numpy(q.dequantize(v.numpy(), s.numpy(), name))
        errors[name] = float((back - x).norm() / x.norm())
    assert errors["int4-rht"] < 0.6 * errors["int4"], errors
    assert errors["int4-rht"] < 0.15, errors


@pytest.mark.parametrize("d", [384, 8, 96, 256])
def test_rotation_is_orthogonal_and_the_one_recorded(d):
    b = q.rotation_block(d)
    assert b == d & -d and d % b == 0
    i = np.arange(b)
    popcount = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(q.hadamard(b), np.where(popcount % 2, -1.0, 1.0))
    r = q.rotation_matrix(d)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-6)
    x = torch.randn(5, 3, d, generator=torch.Generator().manual_seed(d))
    y = q.rotate_torch(x).numpy().astype(np.float64)
    np.testing.assert_allclose(y, x.numpy().astype(np.float64) @ r.T, atol=1e-5)
    np.testing.assert_allclose(y @ r, x.numpy(), atol=1e-5)  # R.T undoes it
    rot = q.encoding("int4-rht", d)["rotation"]
    assert (rot["block"], rot["blocks"], rot["seed"]) == (b, d // b, q.ROTATION_SEED)
    stream = b"".join(hashlib.sha256(f"edje-int4-rht/{rot['seed']}/{k}".encode()).digest() for k in range(2))
    assert rot["signs_hex"] == stream[: (d + 7) // 8].hex()  # the recorded rule, followed by hand
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(rot["signs_hex"]), np.uint8), bitorder="little")[:d]
    np.testing.assert_array_equal(q.rotation_signs(d), 1.0 - 2.0 * bits)
    c = np.array(int(rot["c_float32_hex"], 16), np.uint32).view(np.float32)
    assert c == np.float32(1 / np.sqrt(b)) == q.rotation_scale(d) and rot["c"] == float(c)
    if d >= 96:
        assert 0.3 < (q.rotation_signs(d) < 0).mean() < 0.7


def test_a_store_rotation_other_than_this_versions_is_refused():
    enc = q.encoding("int4-rht", 384)
    q.check_encoding("int4-rht", 384, enc)
    q.check_encoding("int4", 384, q.encoding("int4", 384))
    for change in ({"seed": 1}, {"block": 64}, {"signs_hex": "00" * 48}):
        with pytest.raises(ValueError, match="rotation"):
            q.check_encoding("int4-rht", 384, {**enc, "rotation": {**enc["rotation"], **change}})
    with pytest.raises(ValueError, match="rotation"):
        q.check_encoding("int4-rht", 384, q.encoding("int4", 384))


def test_int4_rotation_choice_names_the_stored_quantization():
    assert q.with_int4_rotation("int4", None) == q.with_int4_rotation("int4", "none") == "int4"
    assert q.with_int4_rotation("int4", "hadamard") == "int4-rht"
    assert q.with_int4_rotation("int8", "none") == "int8"
    with pytest.raises(ValueError, match="applies to --quantize int4 only"):
        q.with_int4_rotation("fp16", "hadamard")
    with pytest.raises(ValueError, match="unknown int4 rotation"):
        q.with_int4_rotation("int4", "dct")
    with pytest.raises(ValueError, match="even"):
        q.quantize(torch.zeros(1, 1, 7), "int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", q.QUANTIZATIONS)
def test_cuda_encode_and_decode_give_the_cpu_bits(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((32, 64, 384), generator=g) * torch.empty((32, 64, 1)).uniform_(0.01, 30, generator=g)
    x[0, 0] = 0
    x[1, :, 5] = 500.0
    cpu_v, cpu_s = q.quantize(x, name)
    gpu_v, gpu_s = q.quantize(x.cuda(), name)
    assert torch.equal(gpu_v.cpu(), cpu_v)
    assert (gpu_s is None and cpu_s is None) or torch.equal(gpu_s.cpu(), cpu_s)
    want = q.dequantize(cpu_v.numpy(), None if cpu_s is None else cpu_s.numpy(), name)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as the reranker's caller might be
        got = q.dequantize_torch(gpu_v, gpu_s, name, dtype=torch.float32)
    np.testing.assert_array_equal(got.cpu().numpy(), want)
