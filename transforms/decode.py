"""Image bytes -> a uint8 [H, W, 3] array at the model's input size.

Normalisation (mean/std) is *not* done here: it runs batched on the model's
device (transforms/encode.py), so the host only moves uint8 pixels.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never accept truncated images: a truncated JPEG is rejected, not padded grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger declared sizes are rejected before decoding


class DecodeRejected(Exception):
    """An image that is refused on purpose (not a decoder failure)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preprocess:
    """Everything that decides the pixels the backbone sees; part of a model's identity.

    ``resize``: ``squash`` resizes to ``size`` ignoring aspect ratio (the EDJE
    authors' SigLIP processor); ``shorter_crop`` resizes the shorter side to
    ``size / crop_pct`` and center-crops (timm's evaluation transform).
    ``jpeg_draft`` lets libjpeg decode at a reduced scale (never below the
    size needed), which is much faster and changes pixels slightly.
    """

    size: tuple[int, int]  # (height, width)
    resize: str = "squash"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0
    jpeg_draft: bool = True
    decoder: str = "pillow"  # or "torchvision": see transforms/decode_torch.py

    def __post_init__(self):
        if self.decoder not in ("pillow", "torchvision"):
            raise ValueError(f"unknown decoder {self.decoder!r}; use 'pillow' or 'torchvision'")
        if self.resize not in ("squash", "shorter_crop"):
            raise ValueError(f"unknown resize mode {self.resize!r}; use 'squash' or 'shorter_crop'")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(INTERPOLATIONS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_timm(cls, data_config: dict) -> "Preprocess":
        """From ``timm.data.resolve_model_data_config(model)``."""
        _, h, w = data_config["input_size"]
        interp = data_config.get("interpolation", "bicubic")
        return cls(
            size=(int(h), int(w)),
            resize="shorter_crop" if data_config.get("crop_mode", "center") == "center" else "squash",
            interpolation=interp if interp in INTERPOLATIONS else "bicubic",
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
            crop_pct=float(data_config.get("crop_pct", 1.0)),
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: keep the top 8 bits of the value range instead of clipping at 255.
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    # Alpha is dropped (as Pillow's and Hugging Face's convert-to-RGB do).
    return im.convert("RGB") if im.mode != "RGB" else im


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and refuse empty files and oversized declared sizes."""
    if not data:
        raise DecodeRejected("empty_file", "image member has zero bytes")
    with warnings.catch_warnings():
        # Pillow's DecompressionBombWarning is replaced by the explicit check below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # Pillow's own limit (2x MAX_IMAGE_PIXELS) hit first
            raise DecodeRejected("too_many_pixels", str(e)) from None
        except UnidentifiedImageError:
            # Pillow's message names the BytesIO object (a memory address); say what the bytes were.
            raise UnidentifiedImageError(
                f"not an image format Pillow can read ({len(data)} bytes starting {data[:8]!r})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise DecodeRejected("too_many_pixels", f"declared size {w}x{h} exceeds the {max_pixels}-pixel limit")
    if w < 1 or h < 1:
        raise DecodeRejected("empty_image", f"declared size {w}x{h}")
    return im


def decode_image(data: bytes, pp: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, orient (EXIF), convert to RGB and resize one image."""
    im = open_checked(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        th, tw = pp.size
        if pp.resize == "shorter_crop":
            need = math.floor(max(th, tw) / pp.crop_pct)
        else:
            need = max(th, tw)
        if pp.jpeg_draft and im.format == "JPEG":
            # draft picks the smallest DCT scale that keeps both sides >= need
            # (either orientation), so the final resize never upsamples more.
            im.draft("RGB", (need, need))
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        resample = INTERPOLATIONS[pp.interpolation]
        if pp.resize == "squash":
            im = im.resize((tw, th), resample)
        else:
            w, h = im.size
            scale = need / min(w, h)
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            im = im.resize((nw, nh), resample)
            left, top = (nw - tw) // 2, (nh - th) // 2
            im = im.crop((left, top, left + tw, top + th))
        return np.asarray(im, dtype=np.uint8)
