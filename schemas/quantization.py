"""The one definition of how token values are stored and recovered.

Writers quantize with :func:`quantize` (torch, so it runs on the device that
produced the tokens); readers recover floats with :func:`dequantize` (numpy)
or :func:`dequantize_torch` (for consumers that dequantize on their GPU). The
two decoders give the same bits: every step of a decode is exact but at most
one float32 multiply (see each encoding).

* ``fp16``: tokens cast to float16. Values outside float16's range are an
  error for the caller to handle (the writer rejects such an image).
* ``int8``: symmetric absmax quantization with one float16 scale per token:
  ``scale`` = the smallest float16 >= ``max|x| / 127`` (rounded *up*, so no
  value needs clamping), ``q = round(x / scale)`` in [-127, 127]. The quotient
  uses the stored fp16 scale, so ``q * scale`` is exactly what a reader
  reconstructs and the error per value is at most ``scale / 2``.
* ``int4``: symmetric absmax quantization to the 15 levels -7..7 (-8 is never
  used, so the grid is symmetric and ``max|x|`` maps to 7 whatever its sign),
  one float16 scale per token, two values per byte:

  - ``scale`` = the smallest float16 with ``7 * scale >= max|x|`` (checked
    exactly: ``7 * scale`` is exact in float32), so nothing clamps; an
    all-zero token has scale 0 and stores q = 0.
  - ``q = round(x / scale)`` (float32 quotient, ties to even), and
    ``|x - q * scale| <= scale / 2`` holds exactly for every value: a half
    step ``(k + 1/2) * scale`` is exact in float32, and the quotient of a
    float32 next to it is more than half an ulp away from ``k + 1/2``, so
    rounding the quotient never moves it across a half step.
  - stored as ``nibble = q + 8`` (1..15; 0 is never written): value ``2j``
    of a token in the low nibble (bits 0-3) of byte ``j``, value ``2j + 1``
    in the high nibble (bits 4-7). The token array is plain ``uint8
    [n, m, d / 2]``.
  - decode: ``value = (nibble - 8) * scale`` in float32 (exact).

  12,416 bytes per image of 64 x 384 (64 * 192 + 64 * 2).
* ``int4-rht``: ``int4`` of each token after a fixed orthogonal rotation,
  undone on decode (``--quantize int4 --int4-rotation hadamard``). A per-token
  absmax grid wastes levels on tokens with a few large coordinates; the
  rotation spreads them over the block, so the grid fits the bulk. With
  ``B`` = the largest power of two dividing ``d`` (128 for d = 384: three
  blocks), ``H`` the Sylvester Hadamard matrix of order ``B`` (``H[i, j] =
  (-1) ** popcount(i & j)``, entries +-1, ``H @ H = B * I``) applied to each
  block of ``B`` consecutive values, ``s`` the fixed random signs (+-1 per
  coordinate, from :data:`ROTATION_SEED`, see :func:`rotation_signs`) and
  ``c = float32(1 / sqrt(B))``:

  - encode: ``y = c * H(s * x)`` (float32, a fast Walsh-Hadamard transform),
    then ``y`` is quantized as ``int4`` above; the bound ``|y - q * scale| <=
    scale / 2`` holds per stored value, so in the token's own coordinates the
    error has L2 norm at most ``sqrt(d) * scale / 2`` and at most
    ``sqrt(B) * scale / 2`` per value (the rotation is orthogonal, up to
    float32 rounding of ``y``).
  - decode: ``t = H(q)`` per block (integers, |t| <= 7 * B: exact),
    ``value = float32(t * scale * c * s)``: ``t * scale`` is exact in float32
    and the multiply by ``c * s`` rounds once, so any decoder that follows the
    recipe (float64 products rounded to float32 at the end, too) gets the same
    bits.
  - the rotation can grow a coordinate up to ``sqrt(B)`` times, so a token
    whose rotated max passes ``7 * 65504`` (possible only with values beyond
    ~40,000) gets a non-finite scale, and the writer rejects the image as it
    does fp16 overflow.

The array attributes of every segment (and the store metadata's
``token_encoding``) carry :func:`encoding`: the recipe in words, with the
rotation's seed, block, ``c`` and signs, so a reader that knows only Zarr and
numpy can decode (tests/test_reader.py does exactly that, from the words).
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np

QUANTIZATIONS = ("fp16", "int8", "int4", "int4-rht")
INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8  # nibble = q + 8
# The seed of int4-rht's random signs. Part of the definition of "int4-rht" (a different seed would be
# another encoding); recorded in every int4-rht store so that a reader can check it and rebuild the signs.
ROTATION_SEED = 0
# --int4-rotation choices -> stored quantization names (pipeline/flags.py); the first is the default
INT4_ROTATIONS = {"none": "int4", "hadamard": "int4-rht"}

# How each encoding is described to readers that know only Zarr; see :func:`encoding` (which adds what
# depends on the token width: the rotation) and schemas/layout.py.
ENCODINGS = {
    "fp16": {"name": "fp16", "tokens_dtype": "float16", "scales": None},
    "int8": {
        "name": "int8-absmax-per-token",
        "tokens_dtype": "int8",
        "scales": "scales",
        "formula": "value = tokens * scales[..., None]",
        "scales_dtype": "float16",
    },
    "int4": {
        "name": "int4-absmax-per-token",
        "tokens_dtype": "uint8",
        "tokens_shape": "[n, m, d / 2]: two 4-bit values per byte",
        "nibble_order": "value 2j of a token is the low nibble (bits 0-3) of byte j, value 2j+1 the high nibble "
        "(bits 4-7)",
        "nibble_offset": INT4_OFFSET,
        "levels": [-INT4_MAX, INT4_MAX],
        "scales": "scales",
        "scales_dtype": "float16",
        "scale_rule": "the smallest float16 with 7 * scale >= max|x| of the token (0 for an all-zero token); "
        "|x - q * scale| <= scale / 2 for every value",
        "formula": "q = nibble - 8 (an integer in -7..7); value = float32(q) * float32(scales[..., None]) (exact)",
        "rotation": None,
    },
}


def check_quantization(name: str) -> str:
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return name


def with_int4_rotation(name: str, rotation: str | None) -> str:
    """The stored quantization name of ``--quantize name --int4-rotation rotation`` (None: the default)."""
    check_quantization(name)
    if rotation is not None and rotation not in INT4_ROTATIONS:
        raise ValueError(f"unknown int4 rotation {rotation!r}; choose one of {', '.join(INT4_ROTATIONS)}")
    if name == "int4":
        return INT4_ROTATIONS[rotation or next(iter(INT4_ROTATIONS))]
    if rotation not in (None, "none"):
        raise ValueError(f"--int4-rotation {rotation} applies to --quantize int4 only, not {name}")
    return name


def is_int4(name: str) -> bool:
    return check_quantization(name) in ("int4", "int4-rht")


def has_scales(name: str) -> bool:
    """Whether the encoding stores a ``scales`` array (one float16 per token)."""
    return check_quantization(name) != "fp16"


def stored_dtype(name: str) -> np.dtype:
    """numpy dtype of the stored token array."""
    return np.dtype({"fp16": np.float16, "int8": np.int8}.get(check_quantization(name), np.uint8))


def stored_row_shape(name: str, tokens: int, dim: int) -> tuple[int, int]:
    """Shape of one image's stored token values: [m, d], or [m, d / 2] for int4 (two values per byte)."""
    if is_int4(name):
        if dim % 2:
            raise ValueError(f"int4 packs two values per byte: the token width must be even, not {dim}")
        return tokens, dim // 2
    return tokens, dim


def bytes_per_image(quantization: str, tokens: int, dim: int) -> int:
    """Bytes of token data (plus scales) one image occupies."""
    m, w = stored_row_shape(quantization, tokens, dim)
    return m * w * stored_dtype(quantization).itemsize + (tokens * 2 if has_scales(quantization) else 0)


# -- int4-rht's rotation ------------------------------------------------------------------------------------


def rotation_block(dim: int) -> int:
    """B: the largest power of two dividing ``dim`` (128 for 384), the order of each Hadamard block."""
    if dim < 2 or dim % 2:
        raise ValueError(f"the Hadamard rotation needs an even token width, not {dim}")
    return dim & -dim


def rotation_scale(dim: int) -> np.float32:
    """c = float32(1 / sqrt(B)): c * H is orthogonal (to float32 rounding)."""
    return np.float32(1.0 / math.sqrt(rotation_block(dim)))


def _sign_stream(dim: int, seed: int) -> bytes:
    """SHA-256("edje-int4-rht/<seed>/0") || SHA-256(".../1") || ..., cut to ceil(dim / 8) bytes."""
    n = (dim + 7) // 8
    blocks = [hashlib.sha256(f"edje-int4-rht/{seed}/{i}".encode()).digest() for i in range((n + 31) // 32)]
    return b"".join(blocks)[:n]


SIGNS_RULE = (
    "signs_hex is S = SHA-256('edje-int4-rht/<seed>/0') || SHA-256('edje-int4-rht/<seed>/1') || ... (UTF-8), "
    "cut to ceil(d / 8) bytes; the sign of coordinate i is -1 if bit i % 8 (least significant first) of byte "
    "i // 8 of S is set, else +1"
)


@functools.lru_cache(maxsize=8)
def rotation_signs(dim: int, seed: int = ROTATION_SEED) -> np.ndarray:
    """The random signs (float32 +-1, [dim]) of int4-rht's rotation: :data:`SIGNS_RULE`."""
    bits = np.unpackbits(np.frombuffer(_sign_stream(dim, seed), np.uint8), bitorder="little")[:dim]
    signs = (1 - 2 * bits.astype(np.int8)).astype(np.float32)
    signs.flags.writeable = False
    return signs


@functools.lru_cache(maxsize=8)
def _decode_factors(dim: int) -> np.ndarray:
    """c * s per coordinate (float32, exact: s is +-1): the one rounding multiply of int4-rht's decode."""
    f = rotation_scale(dim) * rotation_signs(dim)
    f.flags.writeable = False
    return f


@functools.lru_cache(maxsize=8)
def hadamard(block: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order ``block`` (float32 +-1; H[i, j] = (-1) ** popcount(i & j))."""
    h = np.ones((1, 1), np.float32)
    while len(h) < block:  # H_2k = [[H_k, H_k], [H_k, -H_k]]
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def rotation_matrix(dim: int) -> np.ndarray:
    """R (float64 [dim, dim]) with y = R @ x per token: c * blockdiag(H, ..., H) @ diag(s). Orthogonal; for
    tests and for readers that prefer a matrix (the decode is x = R.T @ y)."""
    blocks = np.kron(np.eye(dim // rotation_block(dim)), hadamard(rotation_block(dim)).astype(np.float64))
    return float(rotation_scale(dim)) * blocks * rotation_signs(dim).astype(np.float64)[None, :]


def _hadamard_numpy(x: np.ndarray, block: int, dtype) -> np.ndarray:
    """H applied to each block of ``block`` consecutive values of the last axis of ``x``: [tokens * blocks,
    block] of ``dtype`` (a transposed view).

    The butterflies of a fast Walsh-Hadamard transform (Sylvester order) on a copy laid out block position
    first, so that every add runs along long contiguous rows, ping-ponging between two buffers. numpy runs
    it on the calling thread alone (a BLAS matrix product would fork threads, which stall on a busy
    machine); on the integer levels of a decode every sum is exact."""
    y = np.ascontiguousarray(x.reshape(-1, block).T, dtype=dtype)  # [block, tokens * blocks]
    z = np.empty_like(y)
    h = 1
    while h < block:
        src, dst = y.reshape(block // (2 * h), 2, -1), z.reshape(block // (2 * h), 2, -1)
        np.add(src[:, 0], src[:, 1], out=dst[:, 0])  # positions i and i + h of each group of 2h
        np.subtract(src[:, 0], src[:, 1], out=dst[:, 1])
        y, z = z, y
        h *= 2
    return y.T


def _hadamard_torch(x, block: int, dtype):
    """H applied per block (as :func:`_hadamard_numpy`, in ``x``'s shape) for torch tensors on any device:
    the same adds in the same order (in place)."""
    y = x.reshape(-1, block).t().to(dtype).contiguous()
    h = 1
    while h < block:
        pairs = y.view(block // (2 * h), 2, -1)
        a, b = pairs[:, 0], pairs[:, 1]
        total = a + b
        b.sub_(a).neg_()  # a - b (negation is exact)
        a.copy_(total)
        h *= 2
    return y.t().reshape(x.shape)


def _levels_dtype(block: int) -> np.dtype:
    """An integer dtype that holds H(q) for levels |q| <= 7: |t| <= 7 * block."""
    return np.dtype(np.int16 if INT4_MAX * block < 2**15 else np.int32)


def rotate_torch(x):
    """y = c * H(s * x) per token (float32 torch, any device): int4-rht's rotation before quantizing."""
    import torch

    d = x.shape[-1]
    signs = torch.tensor(rotation_signs(d), device=x.device)
    return _hadamard_torch(x.float() * signs, rotation_block(d), torch.float32) * float(rotation_scale(d))


def encoding(name: str, dim: int) -> dict:
    """What the store metadata (``token_encoding``) and each token array's attributes say about decoding."""
    check_quantization(name)
    if name != "int4-rht":
        return dict(ENCODINGS[name])
    b, c = rotation_block(dim), rotation_scale(dim)
    return {
        **ENCODINGS["int4"],
        "name": "int4-absmax-per-token-rht",
        "scale_rule": "the smallest float16 with 7 * scale >= max|y| of the rotated token y (0 for an all-zero "
        "token); |y - q * scale| <= scale / 2 for every stored value",
        "formula": "q = nibble - 8 (an integer in -7..7); t = q @ H per block of B values (integers, exact); "
        "value = float32(t * scales[..., None] * c * signs) (t * scales is exact in float32, the multiply by "
        "c * signs rounds once)",
        "rotation": {
            "name": "randomized-block-hadamard",
            "block": b,
            "blocks": dim // b,
            "hadamard": "H[i, j] = (-1) ** popcount(i & j) for i, j in 0..B-1 (Sylvester order, entries +-1); "
            "block k acts on values k*B .. k*B+B-1 of a token",
            "c": float(c),
            "c_float32_hex": f"{int(np.array(c).view(np.uint32)):08x}",
            "c_rule": "c = float32(1 / sqrt(B))",
            "seed": ROTATION_SEED,
            "signs_hex": _sign_stream(dim, ROTATION_SEED).hex(),
            "signs_rule": SIGNS_RULE,
            "encode": "y = c * (H applied per block to signs * x), then y quantized as int4",
            "decode": "x = signs * c * (H applied per block to q * scales[..., None])",
        },
    }


def check_encoding(name: str, dim: int, recorded: dict) -> None:
    """ValueError unless a store's recorded ``token_encoding`` decodes as this code decodes ``name``
    (for int4-rht: the same block, seed and signs)."""
    want = encoding(name, dim).get("rotation")
    got = (recorded or {}).get("rotation")
    if want is None and got is None:
        return
    keys = ("name", "block", "seed", "signs_hex", "c_float32_hex")
    if not isinstance(got, dict) or any(got.get(k) != want[k] for k in keys):
        raise ValueError(
            f"the store's {name} rotation ({got!r:.200}) is not the one this version decodes "
            f"(seed {ROTATION_SEED}, block {want['block']})"
        )


# -- encode -------------------------------------------------------------------------------------------------


def _int4_levels(y):
    """(q int8 in -7..7, float16 scale [..., m]) of float32 torch ``y`` [..., m, d]; see the module doc."""
    import torch

    amax = y.abs().amax(dim=-1)
    scale = (amax / INT4_MAX).to(torch.float16)
    # 7 * scale is exact in float32 (3 bits times 11): where it falls short of amax (the casts rounded down,
    # or amax / 7 underflowed to 0), the next float16 up covers it (positive float16s order like their bits).
    # A NaN/inf amax stays non-finite: the encoder rejects that image.
    short = scale.float() * INT4_MAX < amax
    scale = torch.where(short, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # |y - q * s| <= s / 2 exactly: each half step (k + 1/2) * s is a float32 (4 bits times 11), and the
    # float32 quotient of its float32 neighbours stays more than half an ulp off k + 1/2, so a quotient
    # rounds onto a half step only from y exactly on it. The clamp never bites (7 * s >= max|y|).
    q = torch.where(s > 0, y / safe, torch.zeros_like(y)).round()
    return q.clamp_(-INT4_MAX, INT4_MAX).to(torch.int8), scale


def pack_int4_torch(q):
    """int8 q [..., d] in -7..7 -> uint8 [..., d / 2]: value 2j in the low nibble of byte j, 2j+1 in the high."""
    import torch

    nib = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def quantize(x, quantization: str):
    """Encode float tokens ``x`` [..., m, d] (a torch tensor, any device).

    Returns ``(values, scales)`` as torch tensors on ``x``'s device: float16
    values and ``None`` for fp16, int8 values and float16 scales [..., m] for
    int8, packed uint8 values [..., m, d / 2] and float16 scales [..., m] for
    int4 and int4-rht.
    """
    import torch

    check_quantization(quantization)
    x = x.float()
    if quantization == "fp16":
        return x.to(torch.float16), None
    if is_int4(quantization):
        stored_row_shape(quantization, 1, x.shape[-1])  # an odd width is an error
        y = rotate_torch(x) if quantization == "int4-rht" else x
        q, scale = _int4_levels(y)
        return pack_int4_torch(q), scale
    amax = x.abs().amax(dim=-1)
    exact = amax / INT8_MAX
    scale = exact.to(torch.float16)
    # Round the scale up to the next float16 where casting rounded it down:
    # positive float16 values order like their bit patterns.
    # (A token of float32 denormals divides to exactly 0: it still needs a non-zero scale.)
    low = (scale.float() < exact) | ((scale == 0) & (amax > 0))
    scale = torch.where(low, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    s = scale.float().unsqueeze(-1)
    # A token that is all zeros has scale 0; any value divides to 0 there.
    q = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x))
    q = q.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


# -- decode -------------------------------------------------------------------------------------------------


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., d / 2] -> int8 q [..., d] (nibble - 8)."""
    q = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int8)
    np.bitwise_and(packed, 0x0F, out=q[..., 0::2], casting="unsafe")
    np.right_shift(packed, 4, out=q[..., 1::2], casting="unsafe")
    q -= INT4_OFFSET
    return q


def unpack_int4_torch(packed):
    """:func:`unpack_int4` for torch tensors."""
    import torch

    lo = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    hi = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize(
    values: np.ndarray, scales: np.ndarray | None, quantization: str, dtype=np.float32, out: np.ndarray | None = None
) -> np.ndarray:
    """Stored values (and scales) back to floats, as numpy (float32 arithmetic, then cast to ``dtype``).

    ``out``: an array of the result's shape and ``dtype`` to write into and return (no new result array)."""
    check_quantization(quantization)
    dtype = np.dtype(dtype if out is None else out.dtype)
    if quantization == "fp16":
        if out is None:
            return values.astype(dtype, copy=False)
        np.copyto(out, values, casting="unsafe")
        return out
    if scales is None:
        raise ValueError(f"{quantization} tokens need their scales to be decoded")
    s = scales.astype(np.float32)[..., None]
    shape = values.shape[:-1] + (values.shape[-1] * (2 if is_int4(quantization) else 1),)
    result = out if out is not None and dtype == np.float32 else np.empty(shape, np.float32)
    if quantization == "int8":
        np.multiply(values, s, out=result)  # int8 * float32: exact
    elif quantization == "int4":
        np.multiply(unpack_int4(values), s, out=result)  # exact
    else:
        d = shape[-1]
        b = rotation_block(d)
        t = _hadamard_numpy(unpack_int4(values), b, _levels_dtype(b)).reshape(-1, d // b, b)  # integers: exact
        blocks = result.reshape(-1, d // b, b)
        np.multiply(t, s.reshape(-1, 1, 1), out=blocks)  # exact
        blocks *= _decode_factors(d).reshape(d // b, b)  # the one rounding
    if result is out:
        return out
    if out is None:
        return result.astype(dtype, copy=False)
    np.copyto(out, result, casting="unsafe")
    return out


def dequantize_torch(values, scales, quantization: str, dtype=None):
    """Same as :func:`dequantize` for torch tensors (e.g. on a GPU): the same bits."""
    import torch

    dtype = dtype or torch.float32
    if check_quantization(quantization) == "fp16":
        return values.to(dtype)
    s = scales.float().unsqueeze(-1)
    if quantization == "int8":
        return (values.float() * s).to(dtype)
    q = unpack_int4_torch(values)
    if quantization == "int4":
        return (q.float() * s).to(dtype)
    d = q.shape[-1]
    b = rotation_block(d)
    levels = {np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}[_levels_dtype(b)]
    t = _hadamard_torch(q, b, levels)
    factors = torch.tensor(_decode_factors(d), device=t.device)
    return (t.float() * s * factors).to(dtype)
