"""The one definition of how token values are stored and recovered.

Writers quantize with :func:`quantize` (torch, so it runs on the device that
produced the tokens); readers recover floats with :func:`dequantize` (numpy)
or :func:`dequantize_torch` (for consumers that dequantize on their GPU).

* ``fp16``: tokens cast to float16. Values outside float16's range are an
  error for the caller to handle (the writer rejects such an image).
* ``int8``: symmetric absmax quantization with one float16 scale per token:
  ``scale`` = the smallest float16 >= ``max|x| / 127`` (rounded *up*, so no
  value needs clamping), ``q = round(x / scale)`` in [-127, 127]. The quotient
  uses the stored fp16 scale, so ``q * scale`` is exactly what a reader
  reconstructs and the error per value is at most ``scale / 2``.
"""

from __future__ import annotations

import numpy as np

QUANTIZATIONS = ("fp16", "int8")
INT8_MAX = 127

# Recorded in each segment's array attributes so a reader that only knows Zarr
# can still decode; see schemas/layout.py.
ENCODINGS = {
    "fp16": {"name": "fp16", "tokens_dtype": "float16", "scales": None},
    "int8": {
        "name": "int8-absmax-per-token",
        "tokens_dtype": "int8",
        "scales": "scales",
        "formula": "value = tokens * scales[..., None]",
        "scales_dtype": "float16",
    },
}


def check_quantization(name: str) -> str:
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return name


def bytes_per_image(quantization: str, tokens: int, dim: int) -> int:
    """Bytes of token data (plus scales) one image occupies."""
    if check_quantization(quantization) == "fp16":
        return tokens * dim * 2
    return tokens * dim + tokens * 2


def quantize(x, quantization: str):
    """Encode float tokens ``x`` [..., m, d] (a torch tensor, any device).

    Returns ``(values, scales)`` as torch tensors on ``x``'s device: float16
    values and ``None`` for fp16, int8 values and float16 scales [..., m] for
    int8.
    """
    import torch

    check_quantization(quantization)
    x = x.float()
    if quantization == "fp16":
        return x.to(torch.float16), None
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


def dequantize(values: np.ndarray, scales: np.ndarray | None, quantization: str, dtype=np.float32) -> np.ndarray:
    """Stored values (and scales) back to floats, as numpy."""
    if check_quantization(quantization) == "fp16":
        return values.astype(dtype, copy=False)
    if scales is None:
        raise ValueError("int8 tokens need their scales to be decoded")
    return (values.astype(np.float32) * scales.astype(np.float32)[..., None]).astype(dtype, copy=False)


def dequantize_torch(values, scales, quantization: str, dtype=None):
    """Same as :func:`dequantize` for torch tensors (e.g. on a GPU)."""
    import torch

    dtype = dtype or torch.float32
    if check_quantization(quantization) == "fp16":
        return values.to(dtype)
    return (values.float() * scales.float().unsqueeze(-1)).to(dtype)
