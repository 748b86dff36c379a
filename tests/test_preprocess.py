"""Preprocess against timm's own eval transform, the two decoders' geometry, and the identities it records."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from edje_indexer.pipeline.demo import packaged_photos
from edje_indexer.transforms.decoders import decode_image
from edje_indexer.transforms.preprocess import Preprocess

# Odd and even sides, square, landscape, portrait and strips: exercises timm's floor/int/round and the
# half-to-even center-crop offsets on both axes.
IMAGE_SIZES = [(256, 256), (301, 200), (200, 301), (333, 97), (97, 333), (250, 251), (151, 100)]


@pytest.fixture(scope="module")
def images() -> list[tuple[str, Image.Image]]:
    """Real photos resized to IMAGE_SIZES (w, h), each from a different photo where there are enough."""
    photos = packaged_photos()
    out = []
    for i, size in enumerate(IMAGE_SIZES):
        name, path = photos[i % len(photos)]
        with Image.open(path) as im:
            out.append((f"{name}-{size[0]}x{size[1]}", im.convert("RGB").resize(size, Image.Resampling.BICUBIC)))
    return out


@pytest.fixture(scope="module")
def vit_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)


# (id, resolve_data_config args overriding vit_tiny's pretrained cfg); {} is the model's own config.
TIMM_CONFIGS = [
    ("default-center-0.9-bicubic", {}),
    ("center-1.0-bilinear-96", {"input_size": (3, 96, 96), "crop_pct": 1.0, "interpolation": "bilinear"}),
    ("center-0.875-nonsquare", {"input_size": (3, 96, 128), "crop_pct": 0.875}),
    ("center-0.9-portrait-target", {"input_size": (3, 128, 96), "crop_pct": 0.9, "interpolation": "bilinear"}),
    ("center-1.15-pads", {"input_size": (3, 112, 112), "crop_pct": 1.15}),
    ("squash-0.875-bicubic", {"crop_mode": "squash", "crop_pct": 0.875}),
    ("squash-1.0-bilinear", {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear"}),
    ("squash-0.9-nonsquare", {"input_size": (3, 96, 144), "crop_mode": "squash", "crop_pct": 0.9}),
    ("squash-1.15-pads", {"input_size": (3, 112, 112), "crop_mode": "squash", "crop_pct": 1.15}),
    ("border-1.0-bicubic", {"crop_mode": "border", "crop_pct": 1.0}),
    (
        "border-0.9-bilinear-nonsquare",
        {"input_size": (3, 96, 144), "crop_mode": "border", "crop_pct": 0.9, "interpolation": "bilinear"},
    ),
    ("border-0.875-portrait-target", {"input_size": (3, 128, 80), "crop_mode": "border", "crop_pct": 0.875}),
    ("border-1.15", {"input_size": (3, 112, 112), "crop_mode": "border", "crop_pct": 1.15, "mean": (0.5, 0.25, 0.75)}),
]

EXPECTED_MODE = {"center": "shorter_crop", "squash": "squash_crop", "border": "longer_pad"}


def data_config(model, args: dict) -> dict:
    if not args:
        return timm.data.resolve_model_data_config(model)
    return timm.data.resolve_data_config(args=args, model=model)


def timm_pixels(tfm, im: Image.Image, cfg: dict) -> np.ndarray:
    """timm's normalised tensor back to uint8 [H, W, 3]."""
    x = tfm(im).double()
    mean = torch.tensor(cfg["mean"], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float64).view(3, 1, 1)
    x = (x * std + mean) * 255.0
    # The float32 normalise round trip is off by ~1e-4 of a level, far from a rounding boundary.
    assert (x - x.round()).abs().max() < 1e-2
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,args", TIMM_CONFIGS, ids=[c[0] for c in TIMM_CONFIGS])
def test_from_timm_matches_timm_eval_transform(vit_tiny, images, name, args):
    cfg = data_config(vit_tiny, args)
    pp = Preprocess.from_timm(cfg)
    mode = "squash" if cfg["crop_mode"] == "squash" and cfg["crop_pct"] == 1.0 else EXPECTED_MODE[cfg["crop_mode"]]
    assert pp.resize == mode
    assert pp.size == tuple(cfg["input_size"][1:])
    tfm = timm.data.create_transform(**cfg)
    for img_name, im in images:
        ours = decode_image(png(im), pp, jpeg_draft=False)
        theirs = timm_pixels(tfm, im, cfg)
        assert ours.shape == theirs.shape == (*pp.size, 3), img_name
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        # Same Pillow resampler, same sizes and boxes: exact parity, not merely "within rounding".
        assert diff.max() == 0, f"{name} on {img_name}: {int((diff > 0).sum())} values differ, max {diff.max()}"


def test_default_vit_config_is_center_crop(vit_tiny):
    cfg = timm.data.resolve_model_data_config(vit_tiny)
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"]) == ("center", 0.9, "bicubic")


# One Preprocess per mode and shape, built directly (no timm) for the decoder-consistency checks.
MODE_CASES = [
    Preprocess(size=(64, 64), resize="squash", interpolation="bilinear"),
    Preprocess(size=(64, 96), resize="squash", interpolation="bicubic"),
    Preprocess(size=(96, 96), resize="shorter_crop", interpolation="bicubic", crop_pct=0.9),
    Preprocess(size=(64, 96), resize="shorter_crop", interpolation="bilinear", crop_pct=0.875),
    Preprocess(size=(80, 80), resize="shorter_crop", interpolation="bilinear", crop_pct=1.15),
    Preprocess(size=(96, 96), resize="squash_crop", interpolation="bicubic", crop_pct=0.875),
    Preprocess(size=(96, 64), resize="squash_crop", interpolation="bilinear", crop_pct=1.15),
    Preprocess(
        size=(96, 96),
        resize="longer_pad",
        interpolation="bicubic",
        crop_pct=1.0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    Preprocess(size=(64, 96), resize="longer_pad", interpolation="bilinear", crop_pct=0.9),
    Preprocess(size=(80, 80), resize="longer_pad", interpolation="bicubic", crop_pct=1.15),
]


def case_id(pp: Preprocess) -> str:
    return f"{pp.resize}-{pp.size[0]}x{pp.size[1]}-{pp.interpolation}-{pp.crop_pct}"


@pytest.mark.parametrize("pp", MODE_CASES, ids=case_id)
def test_resize_tensor_matches_resize_pillow(images, pp):
    fill = np.array([round(255 * v) for v in pp.mean] if pp.resize == "longer_pad" else [0, 0, 0], np.uint8)
    for img_name, im in images:
        # Geometry: a white image keeps its value through either resampler, so the padded area (exact fill colour)
        # must be the same box in both; a shifted crop or a different resize size would move its edges.
        white = Image.new("RGB", im.size, (255, 255, 255))
        a = np.asarray(pp.resize_pillow(white))
        b = pp.resize_tensor(torch.full((3, im.height, im.width), 255, dtype=torch.uint8)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(a, b, err_msg=img_name)
        assert (np.all(a == 255, axis=2) | np.all(a == fill, axis=2)).all(), img_name
        # Pixels: torch's antialiased interpolate follows Pillow's filters; a one-pixel shift of these photos moves
        # the mean difference above 2 levels.
        a = np.asarray(pp.resize_pillow(im), dtype=np.uint8)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        b = pp.resize_tensor(x).permute(1, 2, 0).numpy()
        assert a.shape == b.shape == (*pp.size, 3), img_name
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() < 0.3, (img_name, diff.mean())
        if pp.interpolation == "bilinear":
            assert diff.max() <= 1, (img_name, diff.max())
        else:
            # Pillow rounds and clips bicubic overshoot to uint8 between its two passes, torch keeps floats: a few
            # values near sharp edges differ by up to ~8 (measured), almost all others by at most 1.
            assert (diff > 1).mean() < 0.01 and diff.max() <= 16, (img_name, (diff > 1).mean(), diff.max())


def test_padding_boxes_follow_timm():
    # A 40x20 (w x h) white image into a 30x30 letterbox: fitted to 30x15, 7 rows of mean colour above, 8 below.
    pp = Preprocess(size=(30, 30), resize="longer_pad", interpolation="bilinear", mean=(0.5, 0.25, 0.75))
    a = np.asarray(pp.resize_pillow(Image.new("RGB", (40, 20), (255, 255, 255))))
    b = pp.resize_tensor(torch.full((3, 20, 40), 255, dtype=torch.uint8)).permute(1, 2, 0).numpy()
    for out in (a, b):
        assert (out[:7] == (128, 64, 191)).all() and (out[22:] == (128, 64, 191)).all()
        assert (out[7:22] == 255).all()


def test_squash_preset_behaviour_unchanged(images):
    # The presets' geometry is part of stored identities: plain Pillow squash, plain antialiased interpolate.
    pp = Preprocess(size=(64, 64), resize="squash", interpolation="bilinear", crop_pct=1.0)
    for _, im in images:
        np.testing.assert_array_equal(
            np.asarray(pp.resize_pillow(im)), np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR))
        )
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
        old = (
            torch.nn.functional.interpolate(
                x[None].float(), size=(64, 64), mode="bilinear", antialias=True, align_corners=False
            )
            .round()
            .clamp(0, 255)
            .to(torch.uint8)[0]
        )
        torch.testing.assert_close(pp.resize_tensor(x), old, rtol=0, atol=0)
    assert pp.draft_size() == 64


def test_identity_dicts_unchanged(vit_tiny):
    # Hashed into stored model identities: these exact JSON strings must not change.
    siglip = Preprocess(
        size=(384, 384),
        resize="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        crop_pct=1.0,
    )
    assert json.dumps(siglip.to_dict(), sort_keys=True) == (
        '{"crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "resize": "squash", '
        '"size": [384, 384], "std": [0.5, 0.5, 0.5]}'
    )
    assert list(siglip.to_dict()) == ["size", "resize", "interpolation", "mean", "std", "crop_pct"]
    tiny = Preprocess(size=(64, 64), resize="squash", interpolation="bilinear", crop_pct=1.0)
    assert tiny.to_dict()["size"] == [64, 64] and len(tiny.to_dict()) == 6
    vit = Preprocess.from_timm(timm.data.resolve_model_data_config(vit_tiny))
    assert vit.to_dict() == {
        "size": [224, 224],
        "resize": "shorter_crop",
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 0.9,
    }


def jpeg_header(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


DRAFT_IMAGES = [(800, 800), (1000, 700), (700, 1000), (1600, 420), (420, 1600), (1203, 801), (640, 642)]


@pytest.fixture(scope="module")
def jpegs() -> dict[tuple[int, int], bytes]:
    return {s: jpeg_header(*s) for s in DRAFT_IMAGES}


def drafted(data: bytes, need: int) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (need, need))
        return im.size  # the draft size is known from the header, nothing decoded


@pytest.mark.parametrize("pp", MODE_CASES, ids=case_id)
def test_draft_size_never_starves_the_resize(jpegs, pp):
    need = pp.draft_size()
    reduced = 0
    for (w, h), data in jpegs.items():
        dw, dh = drafted(data, need)
        reduced += (dw, dh) != (w, h)
        # At least the resolution the full-size decode would be resized to, on both axes: the resize never upsamples.
        fh, fw = pp.resized_size(h, w)
        assert dh >= fh and dw >= fw, ((w, h), (dw, dh), (fw, fh))
    assert reduced >= 3  # the images are large enough for draft to act


@pytest.mark.parametrize("pp", MODE_CASES, ids=case_id)
def test_draft_size_is_tight(pp):
    # One less and a square image that draft halves exactly would come out smaller than its resize.
    need = pp.draft_size() - 1
    side = 2 * need
    dw, dh = drafted(jpeg_header(side, side), need)
    assert (dw, dh) == (need, need)
    fh, fw = pp.resized_size(side, side)
    assert dh < fh or dw < fw


def test_refuses_unknown_values_by_name():
    with pytest.raises(ValueError, match="'crop'"):
        Preprocess(size=(8, 8), resize="crop")
    with pytest.raises(ValueError, match="'lanczos'"):
        Preprocess(size=(8, 8), interpolation="lanczos")
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(size=(8, 8), resize="squash", crop_pct=0.9)
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(size=(8, 8), resize="shorter_crop", crop_pct=0.0)
    base = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}
    for interp in ("lanczos", "nearest", "box", "hamming", "random"):
        with pytest.raises(ValueError, match=repr(interp)):
            Preprocess.from_timm({**base, "interpolation": interp, "crop_mode": "center"})
    with pytest.raises(ValueError, match="'letterbox'"):
        Preprocess.from_timm({**base, "interpolation": "bicubic", "crop_mode": "letterbox"})
    with pytest.raises(ValueError, match="crop_border_pixels"):
        Preprocess.from_timm({**base, "interpolation": "bicubic", "crop_border_pixels": 2})


def test_from_timm_defaults_follow_create_transform():
    # Keys create_transform defaults itself: crop_pct 0.875, crop_mode center, interpolation bilinear.
    pp = Preprocess.from_timm({"input_size": (3, 32, 48), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)})
    assert (pp.resize, pp.crop_pct, pp.interpolation, pp.size) == ("shorter_crop", 0.875, "bilinear", (32, 48))
