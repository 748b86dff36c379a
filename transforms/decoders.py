"""Image bytes -> uint8 pixels at the model's input size: the :class:`Decoder` interface.

A decoder works in two halves, so that the slow part runs where it can:

* :meth:`Decoder.prepare` runs on the decode thread pool, one image at a time
  (header checks, decoding where the device will not do it);
* :meth:`Decoder.assemble` runs on the encoder's thread, once per batch, and
  turns the prepared items into one uint8 batch (plus an error per item that
  could not be used).

Two implementations, chosen by ``ModelSpec.decoder`` (part of the model
identity: Pillow- and torchvision-decoded stores are not mixed):

* :class:`PillowDecoder` (default): Pillow with ``draft()`` for JPEGs, EXIF
  orientation, RGB conversion; ``prepare`` returns the final
  uint8 [H, W, 3] array, ``assemble`` stacks them.
* :class:`TorchvisionDecoder`: on a GPU, plain JPEGs (no EXIF rotation, not
  CMYK) pass through ``prepare`` as bytes and are decoded in one batched
  ``torchvision.io.decode_jpeg(..., device=cuda)`` call (nvJPEG: ~12,000
  images/s on an H200 against ~190 per core for Pillow, edje.md); every other
  image is decoded on the CPU at full size by torchvision's decoder for its
  format (JPEG, PNG, WebP), or by Pillow (GIF: the first frame only; BMP,
  TIFF; and what torchvision cannot decode). All are resized on the device by
  :meth:`Preprocess.resize_tensor`. ``batched_jpeg`` turns the pass-through on
  for any device: the tests run the batched path with the CPU as "device".
  torchvision 0.29 marks its image decoders deprecated in favour of
  TorchCodec; they are still the way to reach nvJPEG from torchvision today.

Only :data:`SUPPORTED_FORMATS` are decoded, by either decoder: the format is
found from the header before anything is decoded, and anything else is
refused as ``unsupported_format`` (:func:`open_checked`).
"""

from __future__ import annotations

import io
import warnings
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from edje_indexer.transforms.preprocess import Preprocess

# Never accept truncated images: a truncated JPEG is rejected, not padded grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger declared sizes are rejected before decoding
DECODERS = ("pillow", "torchvision")


class DecodeRejected(Exception):
    """An image that is refused on purpose (not a decoder failure)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Decoder(Protocol):
    def prepare(self, data: bytes):
        """Decode-thread half for one image; raises DecodeRejected or any decoder error."""

    def assemble(self, items: list) -> tuple[np.ndarray | torch.Tensor, list[Exception | None]]:
        """Batch half: ``(uint8 batch of the usable items, errors[i] or None per item)``."""


def to_rgb(im: Image.Image) -> Image.Image:
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


# The only formats decoded (Pillow's names). Pillow would otherwise try every format it knows
# (~43, whatever the member's extension; EPS content goes to Ghostscript where installed), and
# torchvision's decode_image also decodes AVIF and HEIC. An MPO (a JPEG with more pictures
# after the first) opens through the JPEG plugin and counts as JPEG.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def identify_unsupported(data: bytes) -> str | None:
    """Pillow's name for the format of ``data`` if it is an image format outside SUPPORTED_FORMATS,
    found without decoding anything: Pillow's header-only open (nothing is loaded, so no
    Ghostscript, no codec), or failing that the first format whose signature matches the first
    bytes. None if it is no format Pillow knows, or if it has the signature of a supported format
    (a damaged image then, not an unsupported one)."""
    Image.init()
    prefix = data[:16]

    def accepts(fmt: str) -> bool:
        accept = Image.OPEN[fmt][1]
        try:
            return bool(accept and accept(prefix))
        except Exception:  # noqa: BLE001 -- a plugin's check failing means "not this format"
            return False

    if any(accepts(fmt) for fmt in SUPPORTED_FORMATS if fmt in Image.OPEN):
        return None
    others = [fmt for fmt in Image.ID if fmt not in SUPPORTED_FORMATS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=others) as im:  # the header only: never loaded
                return im.format
    except Exception:  # noqa: BLE001 -- no header parses: name the first format whose signature matches
        return next((fmt for fmt in others if accepts(fmt)), None)


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and refuse empty files, formats outside SUPPORTED_FORMATS and
    oversized declared sizes."""
    if not data:
        raise DecodeRejected("empty_file", "image member has zero bytes")
    with warnings.catch_warnings():
        # Pillow's DecompressionBombWarning is replaced by the explicit check below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except Image.DecompressionBombError as e:  # Pillow's own limit (2x MAX_IMAGE_PIXELS) hit first
            raise DecodeRejected("too_many_pixels", str(e)) from None
        except UnidentifiedImageError:
            found = identify_unsupported(data)
            if found is not None:
                raise DecodeRejected(
                    "unsupported_format",
                    f"{found} image ({len(data)} bytes starting {data[:8]!r}): only "
                    f"{', '.join(SUPPORTED_FORMATS)} images are decoded",
                ) from None
            # Pillow's message names the BytesIO object (a memory address); say what the bytes were.
            raise UnidentifiedImageError(
                f"not an image format Pillow can read ({len(data)} bytes starting {data[:8]!r})"
            ) from None
    w, h = im.size
    if w * h > max_pixels:
        raise DecodeRejected("too_many_pixels", f"declared size {w}x{h} exceeds the {max_pixels}-pixel limit")
    if w < 1 or h < 1:
        raise DecodeRejected("empty_image", f"declared size {w}x{h}")
    return im


def decode_image(
    data: bytes, pp: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = True
) -> np.ndarray:
    """Decode, orient (EXIF), convert to RGB and resize one image with Pillow: uint8 [H, W, 3].

    ``jpeg_draft`` lets libjpeg decode at a reduced DCT scale, never below
    what the resize needs (much faster; changes pixels slightly).
    """
    im = open_checked(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if jpeg_draft and im.format == "JPEG":
            need = pp.draft_size()
            # draft picks the smallest DCT scale that keeps both sides >= need
            # (either orientation), so the final resize never upsamples more.
            im.draft("RGB", (need, need))
        im.load()
        im = to_rgb(ImageOps.exif_transpose(im))
        return np.asarray(pp.resize_pillow(im), dtype=np.uint8)


class PillowDecoder:
    def __init__(self, pp: Preprocess, jpeg_draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pp, self.jpeg_draft, self.max_pixels = pp, jpeg_draft, max_pixels

    def prepare(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.pp, self.max_pixels, self.jpeg_draft)

    def assemble(self, items: list) -> tuple[np.ndarray, list]:
        return np.stack(items), [None] * len(items)


class RawJpeg:
    """JPEG bytes whose decoding is left to the batched device decoder."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _pillow_tensor(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
        im.load()  # an animation's first frame only
        im = to_rgb(ImageOps.exif_transpose(im))
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# The formats torchvision decodes here. GIF goes to Pillow (torchvision decodes every frame of an
# animation, at screen size), and so do BMP and TIFF (torchvision has no decoder for them).
_TORCHVISION_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")


def decode_full(data: bytes, fmt: str | None = None) -> torch.Tensor:
    """uint8 [3, h, w] on the CPU, EXIF-oriented, first frame of an animation.

    ``fmt`` is Pillow's name for the format (:func:`open_checked` finds it when not given, and
    refuses what is not in SUPPORTED_FORMATS), so the format is known before anything is decoded.
    torchvision only ever sees what Pillow identified as JPEG, PNG or WebP; its ``decode_image``
    picks its decoder by the same leading signature bytes (checked before AVIF and HEIC)."""
    import torchvision.io as tvio

    if fmt is None:
        fmt = open_checked(data).format
    if fmt not in _TORCHVISION_FORMATS:
        return _pillow_tensor(data)
    try:
        x = tvio.decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=tvio.ImageReadMode.RGB,
            apply_exif_orientation=True,
        )
        if x.ndim == 4:  # never for these formats; kept as a guard: the first frame only
            x = x[0]
        if x.dtype != torch.uint8:  # 16-bit PNG
            x = (x.float() / 257.0).round().clamp(0, 255).to(torch.uint8)
        return x
    except (RuntimeError, ValueError):
        return _pillow_tensor(data)  # formats/modes torchvision does not decode (e.g. CMYK, BMP variants)


class TorchvisionDecoder:
    def __init__(
        self,
        pp: Preprocess,
        device: torch.device | str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batched_jpeg: bool | None = None,
    ):
        self.pp, self.max_pixels = pp, max_pixels
        self.device = torch.device(device)
        # Decoding JPEGs in one batched call pays on a GPU (nvJPEG); elsewhere it is the same libjpeg.
        self.batched_jpeg = self.device.type == "cuda" if batched_jpeg is None else batched_jpeg

    def prepare(self, data: bytes):
        """A RawJpeg (decoded later, batched, on the device), or a full-size uint8 [3, h, w]
        CPU tensor (resized later on the device); on a CPU device without batching, the final
        uint8 [H, W, 3] array."""
        im = open_checked(data, self.max_pixels)
        if (
            self.batched_jpeg
            and im.format == "JPEG"
            and im.mode in ("RGB", "L")
            and im.getexif().get(0x0112, 1) in (0, 1)
        ):
            return RawJpeg(data)
        x = decode_full(data, im.format)
        if self.device.type == "cpu" and not self.batched_jpeg:
            return self.pp.resize_tensor(x).permute(1, 2, 0).numpy()
        return x

    def _decode_jpegs(self, items: list, raw: list[int], out: list, errors: list) -> None:
        import torchvision.io as tvio

        tensors = [torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8) for i in raw]
        try:
            decoded = tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded = [None] * len(raw)  # one bad JPEG fails the whole call: retry one by one below
        for i, x in zip(raw, decoded):
            if x is None:
                try:
                    x = tvio.decode_jpeg(
                        torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8),
                        mode=tvio.ImageReadMode.RGB,
                        device=self.device,
                    )
                except RuntimeError:
                    try:
                        x = decode_full(items[i].data, "JPEG").to(self.device, non_blocking=True)
                    except Exception as e:  # noqa: BLE001 -- this image only
                        errors[i] = e
                        continue
            out[i] = self.pp.resize_tensor(x)

    def assemble(self, items: list) -> tuple[torch.Tensor | np.ndarray, list]:
        if self.device.type == "cpu" and not self.batched_jpeg:
            return np.stack(items), [None] * len(items)
        out: list[torch.Tensor | None] = [None] * len(items)
        errors: list[Exception | None] = [None] * len(items)
        raw = [i for i, it in enumerate(items) if isinstance(it, RawJpeg)]
        if raw:
            self._decode_jpegs(items, raw, out, errors)
        for i, it in enumerate(items):
            if isinstance(it, torch.Tensor):
                src = it.pin_memory() if self.device.type == "cuda" else it
                out[i] = self.pp.resize_tensor(src.to(self.device, non_blocking=True))
        kept = [x for x in out if x is not None]
        batch = torch.stack(kept) if kept else torch.zeros((0, 3, *self.pp.size), dtype=torch.uint8, device=self.device)
        return batch, errors


def make_decoder(
    name: str,
    pp: Preprocess,
    device: torch.device | str = "cpu",
    jpeg_draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoder:
    """The decoder a model spec names (``"pillow"`` or ``"torchvision"``)."""
    if name == "pillow":
        return PillowDecoder(pp, jpeg_draft, max_pixels)
    if name == "torchvision":
        return TorchvisionDecoder(pp, device, max_pixels)
    raise ValueError(f"unknown decoder {name!r}; use one of {', '.join(DECODERS)}")
