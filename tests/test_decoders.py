"""The decoders (edje_indexer.transforms.decoders): batched JPEGs on the CPU (and a GPU), Pillow, make_decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.io
from helpers import image_bytes
from PIL import Image

from edje_indexer.transforms.decoders import (
    DecodeRejected,
    PillowDecoder,
    RawJpeg,
    TorchvisionDecoder,
    decode_full,
    decode_image,
    make_decoder,
)
from edje_indexer.transforms.preprocess import Preprocess

PP = Preprocess(size=(48, 40))  # not square: a transposed result would show


def corrupt_jpeg(data: bytes) -> bytes:
    """A JPEG whose header still opens (Pillow reads the size) but whose Huffman table is bogus: libjpeg fails."""
    i = data.find(b"\xff\xc4")  # DHT: marker, length (2), class/id (1), 16 code counts
    assert i > 0
    bad = bytearray(data)
    bad[i + 5 : i + 21] = b"\xff" * 16
    return bytes(bad)


def with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(im, "JPEG", exif=exif.tobytes())


@pytest.fixture(scope="module")
def jpegs(photos):
    return [image_bytes(im, "JPEG", quality=90) for _, im in photos[:5]]


@pytest.fixture(scope="module")
def mixed(photos, jpegs):
    """[jpeg, jpeg, png, corrupt jpeg, jpeg, grayscale jpeg, jpeg]: (bytes, kind) pairs."""
    png = image_bytes(photos[5][1], "PNG")
    gray = image_bytes(photos[6][1].convert("L"), "JPEG")
    return [
        (jpegs[0], "jpeg"),
        (jpegs[1], "jpeg"),
        (png, "png"),
        (corrupt_jpeg(jpegs[2]), "corrupt"),
        (jpegs[3], "jpeg"),
        (gray, "jpeg"),
        (jpegs[4], "jpeg"),
    ]


def reference(data: bytes) -> np.ndarray:
    """The non-batched CPU path: one image at a time, uint8 [H, W, 3]."""
    return TorchvisionDecoder(PP, "cpu").prepare(data)


class CountCalls:
    def __init__(self, monkeypatch):
        self.calls = []
        real = torchvision.io.decode_jpeg

        def decode_jpeg(input, *args, **kwargs):
            self.calls.append(len(input) if isinstance(input, list) else None)
            return real(input, *args, **kwargs)

        monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)


def test_batched_jpeg_on_the_cpu_equals_one_by_one(mixed):
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    prepared = [dec.prepare(data) for data, _ in mixed]
    for p, (_, kind) in zip(prepared, mixed):
        if kind == "png":
            assert isinstance(p, torch.Tensor) and p.dtype == torch.uint8 and p.shape[0] == 3
        else:
            assert isinstance(p, RawJpeg)  # left to the batched decode, even the corrupt one (its header is fine)
    png_data = mixed[2][0]
    assert torch.equal(prepared[2], decode_full(png_data))  # full size, not resized yet

    batch, errors = dec.assemble(prepared)
    assert [e is not None for e in errors] == [kind == "corrupt" for _, kind in mixed]
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.device.type == "cpu"
    good = [data for data, kind in mixed if kind != "corrupt"]
    assert batch.shape == (len(good), 3, *PP.size)
    for got, data in zip(batch, good):
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), reference(data))


def test_batched_jpeg_is_one_decode_jpeg_call_on_a_list(jpegs, monkeypatch):
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    prepared = [dec.prepare(d) for d in jpegs]
    counter = CountCalls(monkeypatch)
    batch, errors = dec.assemble(prepared)
    assert counter.calls == [len(jpegs)]
    assert errors == [None] * len(jpegs)
    assert batch.shape == (len(jpegs), 3, *PP.size)


def test_one_corrupt_jpeg_falls_back_to_one_by_one(mixed, monkeypatch):
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    prepared = [dec.prepare(d) for d, _ in mixed]
    counter = CountCalls(monkeypatch)
    _, errors = dec.assemble(prepared)
    raw = sum(isinstance(p, RawJpeg) for p in prepared)
    assert counter.calls[0] == raw  # the batched call first; it fails as a whole
    assert counter.calls[1:] == [None] * raw  # then each JPEG alone
    corrupt = errors[[k for _, k in mixed].index("corrupt")]
    assert isinstance(corrupt, Exception)


def test_a_batch_of_only_corrupt_jpegs_is_empty_with_an_error_each(jpegs):
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    prepared = [dec.prepare(corrupt_jpeg(d)) for d in jpegs[:2]]
    batch, errors = dec.assemble(prepared)
    assert batch.shape == (0, 3, *PP.size) and batch.dtype == torch.uint8
    assert all(isinstance(e, Exception) for e in errors)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_are_not_batched_and_are_rotated(photos, orientation):
    im = photos[0][1].crop((0, 0, 120, 80))  # not square
    data = with_orientation(im, orientation)
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    p = dec.prepare(data)
    assert isinstance(p, torch.Tensor)
    w, h = im.size
    assert tuple(p.shape[1:]) == ((w, h) if orientation in (6, 8) else (h, w))
    batch, errors = dec.assemble([p])
    assert errors == [None]
    np.testing.assert_array_equal(batch[0].permute(1, 2, 0).numpy(), reference(data))


def test_cmyk_jpegs_are_not_batched(photos):
    data = image_bytes(photos[1][1].convert("CMYK"), "JPEG")
    dec = TorchvisionDecoder(PP, "cpu", batched_jpeg=True)
    p = dec.prepare(data)
    assert isinstance(p, torch.Tensor)
    batch, errors = dec.assemble([p])
    assert errors == [None]
    np.testing.assert_array_equal(batch[0].permute(1, 2, 0).numpy(), reference(data))


def test_non_batched_cpu_decoder_gives_final_arrays(jpegs):
    dec = TorchvisionDecoder(PP, "cpu")
    assert not dec.batched_jpeg
    p = dec.prepare(jpegs[0])
    assert isinstance(p, np.ndarray) and p.shape == (*PP.size, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, PP.resize_tensor(decode_full(jpegs[0])).permute(1, 2, 0).numpy())
    batch, errors = dec.assemble([p, dec.prepare(jpegs[1])])
    assert isinstance(batch, np.ndarray) and batch.shape == (2, *PP.size, 3) and errors == [None, None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_nvjpeg_on_the_gpu_is_close_to_the_cpu(mixed):
    dec = TorchvisionDecoder(PP, "cuda")
    assert dec.batched_jpeg  # the default on a GPU
    prepared = [dec.prepare(data) for data, _ in mixed]
    assert [isinstance(p, RawJpeg) for p in prepared] == [kind != "png" for _, kind in mixed]
    batch, errors = dec.assemble(prepared)
    assert isinstance(batch, torch.Tensor) and batch.device.type == "cuda" and batch.dtype == torch.uint8
    assert [e is not None for e in errors] == [kind == "corrupt" for _, kind in mixed]
    good = [data for data, kind in mixed if kind != "corrupt"]
    assert batch.shape == (len(good), 3, *PP.size)
    for got, data in zip(batch.cpu(), good):
        diff = np.abs(got.permute(1, 2, 0).numpy().astype(np.int16) - reference(data).astype(np.int16))
        assert diff.mean() < 2, diff.mean()


# -- Pillow and make_decoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("draft", [True, False])
def test_pillow_decoder_is_decode_image(photos, fmt, draft):
    big = photos[2][1].resize((400, 300))  # large enough for draft() to pick a reduced DCT scale
    data = image_bytes(big, fmt)
    dec = PillowDecoder(PP, jpeg_draft=draft)
    p = dec.prepare(data)
    np.testing.assert_array_equal(p, decode_image(data, PP, jpeg_draft=draft))
    assert p.shape == (*PP.size, 3) and p.dtype == np.uint8
    batch, errors = dec.assemble([p, p])
    assert batch.shape == (2, *PP.size, 3) and errors == [None, None]
    np.testing.assert_array_equal(batch[1], p)


def test_jpeg_draft_changes_pixels_of_a_large_jpeg(photos):
    data = image_bytes(photos[2][1].resize((400, 300)), "JPEG")
    assert not np.array_equal(
        PillowDecoder(PP, jpeg_draft=True).prepare(data), PillowDecoder(PP, jpeg_draft=False).prepare(data)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda mp: PillowDecoder(PP, max_pixels=mp),
        lambda mp: TorchvisionDecoder(PP, "cpu", max_pixels=mp),
        lambda mp: TorchvisionDecoder(PP, "cpu", max_pixels=mp, batched_jpeg=True),
    ],
)
def test_decoders_refuse_empty_and_oversized_images(jpegs, make):
    with pytest.raises(DecodeRejected) as e:
        make(10_000).prepare(b"")
    assert e.value.reason == "empty_file"
    w, h = Image.open(io.BytesIO(jpegs[0])).size
    with pytest.raises(DecodeRejected) as e:
        make(w * h - 1).prepare(jpegs[0])
    assert e.value.reason == "too_many_pixels"
    assert make(w * h).prepare(jpegs[0]) is not None


def test_make_decoder():
    p = make_decoder("pillow", PP, jpeg_draft=False, max_pixels=123)
    assert isinstance(p, PillowDecoder) and (p.pp, p.jpeg_draft, p.max_pixels) == (PP, False, 123)
    t = make_decoder("torchvision", PP, "cpu", max_pixels=77)
    assert isinstance(t, TorchvisionDecoder) and t.device == torch.device("cpu") and t.max_pixels == 77
    assert not t.batched_jpeg
    with pytest.raises(ValueError, match="'nvjpeg'") as e:
        make_decoder("nvjpeg", PP)
    assert "pillow" in str(e.value) and "torchvision" in str(e.value)
