"""The ``torchvision`` decoder: JPEGs decoded on the model's device (nvJPEG on a GPU).

Used when ``Preprocess.decoder == "torchvision"``. On a GPU worker, Pillow on a
few cores cannot keep up with a large ViT (edje.md: ~190 images/s per core
against ~1,100 images/s of ViT-L/384), while nvJPEG decodes ~12,000/s. So:

* plain JPEGs (no EXIF rotation, not CMYK) are passed through as bytes and
  decoded in one batched ``torchvision.io.decode_jpeg(..., device=cuda)`` call;
* every other image (PNG, WebP, GIF, rotated or CMYK JPEG, anything nvJPEG
  refuses) is decoded on the CPU by ``torchvision.io.decode_image``, or by
  Pillow where torchvision cannot, at full size;
* all images are then resized with ``torch.nn.functional.interpolate``
  (antialiased, like Pillow) on the model's device, so one store holds one
  preprocessing whatever the decoder of each image was.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec;
they are still the way to reach nvJPEG from torchvision today.

On a CPU-only worker the same code runs with the CPU as "device", which is how
the tests exercise it. The decoder is part of the preprocessing identity:
Pillow- and torchvision-decoded stores are not mixed.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from edje_indexer.transforms.decode import Preprocess, _to_rgb, open_checked


class RawJpeg:
    """JPEG bytes whose decoding is left to the batched device decoder."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _pillow_tensor(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = _to_rgb(ImageOps.exif_transpose(im))
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_full(data: bytes) -> torch.Tensor:
    """uint8 [3, h, w] on the CPU, EXIF-oriented, first frame of an animation."""
    import torchvision.io as tvio

    try:
        x = tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB,
                              apply_exif_orientation=True)
        if x.ndim == 4:  # animated GIF: all frames
            x = x[0]
        if x.dtype != torch.uint8:  # 16-bit PNG
            x = (x.float() / 257.0).round().clamp(0, 255).to(torch.uint8)
        return x
    except (RuntimeError, ValueError):
        return _pillow_tensor(data)  # formats/modes torchvision does not decode (e.g. CMYK, BMP variants)


def resize(x: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, H, W] on x's device, as Preprocess says."""
    th, tw = pp.size
    mode = "bicubic" if pp.interpolation == "bicubic" else "bilinear"
    y = x.unsqueeze(0).float()
    if pp.resize == "squash":
        y = F.interpolate(y, size=(th, tw), mode=mode, antialias=True, align_corners=False)
    else:
        need = math.floor(max(th, tw) / pp.crop_pct)
        h, w = x.shape[1:]
        scale = need / min(h, w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        y = F.interpolate(y, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        y = y[..., top:top + th, left:left + tw]
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


def prepare(data: bytes, pp: Preprocess, max_pixels: int, device: torch.device):
    """Thread-pool half: header checks, CPU decoding where the device will not do it.

    Returns a RawJpeg (decode later, batched, on the device), a uint8 [3, h, w]
    CPU tensor (full size: resized later on the device), or, on a CPU device,
    the final uint8 [H, W, 3] array.
    """
    im = open_checked(data, max_pixels)
    if device.type == "cuda" and im.format == "JPEG" and im.mode in ("RGB", "L") \
            and im.getexif().get(0x0112, 1) in (0, 1):
        return RawJpeg(data)
    x = decode_full(data)
    if device.type == "cuda":
        return x
    return resize(x, pp).permute(1, 2, 0).numpy()


def assemble(items: list, pp: Preprocess, device: torch.device) -> tuple[torch.Tensor | np.ndarray, list]:
    """Batch half: the prepared items of one batch -> a uint8 batch, plus errors.

    Returns ``(batch, errors)`` where ``errors[i]`` is None or the exception
    that made item i undecodable (its row is then dropped from the batch).
    """
    if device.type != "cuda":
        return np.stack(items), [None] * len(items)
    out: list[torch.Tensor | None] = [None] * len(items)
    errors: list[Exception | None] = [None] * len(items)
    import torchvision.io as tvio

    raw = [i for i, it in enumerate(items) if isinstance(it, RawJpeg)]
    if raw:
        tensors = [torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8) for i in raw]
        try:
            decoded = tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [None] * len(raw)  # one bad JPEG fails the whole call: retry one by one below
        for i, x in zip(raw, decoded):
            if x is None:
                try:
                    x = tvio.decode_jpeg(torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8),
                                         mode=tvio.ImageReadMode.RGB, device=device)
                except RuntimeError:
                    try:
                        x = decode_full(items[i].data).to(device, non_blocking=True)
                    except Exception as e:  # noqa: BLE001 -- this image only
                        errors[i] = e
                        continue
            out[i] = resize(x, pp)
    for i, it in enumerate(items):
        if isinstance(it, torch.Tensor):
            out[i] = resize(it.pin_memory().to(device, non_blocking=True), pp)
    kept = [x for x in out if x is not None]
    batch = torch.stack(kept) if kept else torch.zeros((0, 3, *pp.size), dtype=torch.uint8, device=device)
    return batch, errors
