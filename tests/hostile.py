"""A hostile test corpus: broken, odd and malicious input, with the outcome each case must have.

Everything is generated (Pillow, numpy, ``tarfile``), nothing is downloaded.
``tarfile`` is used directly because the cases need control that a
WebDataset writer does not give: member order, duplicate names, subfolders,
directory entries, and archives cut at chosen bytes.

Three corpora, one job each (see tests/test_hostile.py):

* :func:`write_sample_corpus`: two shards of sample-level cases
  (:data:`SAMPLE_CASES`). Bad samples come before good ones, so every good
  sample proves that a rejection never stops the rest of its shard.
* :func:`write_shard_corpus`: shard-level cases (:data:`SHARD_CASES`) next to
  one healthy shard.
* :func:`write_unreadable_corpus`: only shards that cannot be read at all.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

# ---------------------------------------------------------------- images

BOMB_SIDE = 30_000  # 900 MP declared: far over both our limit (100 MP) and Pillow's own (179 MP)
OVER_LIMIT_SIDE = 12_000  # 144 MP declared: over our limit, under Pillow's DecompressionBombError


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(h: int = 96, w: int = 128, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + y) / 9.0)], axis=-1)
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg(im: Image.Image | None = None, **kw) -> bytes:
    return _save(im if im is not None else photo(), "JPEG", quality=kw.pop("quality", 90), **kw)


def png(im: Image.Image | None = None, **kw) -> bytes:
    return _save(im if im is not None else photo(), "PNG", **kw)


def truncated_jpeg() -> bytes:
    """A valid JPEG header, cut halfway through the entropy-coded data."""
    data = jpeg(photo(seed=1))
    return data[: len(data) // 2]


def zero_bytes() -> bytes:
    return b""


def random_bytes(n: int = 4096, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def text_file() -> bytes:
    return b"this is a caption, not an image\n" * 20


def one_pixel_png() -> bytes:
    return png(Image.new("RGB", (1, 1), (200, 30, 60)))


def one_pixel_jpeg() -> bytes:
    return jpeg(Image.new("RGB", (1, 1), (200, 30, 60)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A ~100-byte PNG whose IHDR declares ``width x height`` RGB pixels.

    The IDAT holds a few zero rows only: decoding would have to allocate the
    full declared size before finding out, so the size must be refused from
    the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    comp = zlib.compressobj(9)
    idat = comp.compress(b"\x00" * (1 + 3 * width) * 4) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A small JPEG whose SOF0 frame header is patched to declare ``width x height``."""
    data = bytearray(jpeg(Image.new("RGB", (16, 16), (90, 90, 90))))
    sof = data.index(b"\xff\xc0")
    # FFC0, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gray16_png() -> bytes:
    """16-bit grayscale PNG (Pillow mode I;16) using the full 0..65535 range."""
    y, x = np.mgrid[0:48, 0:64]
    arr = ((x * 1023 + y * 40) % 65536).astype(np.uint16)
    return png(Image.fromarray(arr))


def palette_transparent_png() -> bytes:
    """Palette ('P') PNG with a tRNS entry (index 0 fully transparent)."""
    im = Image.new("P", (40, 30), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    arr = (np.indices((30, 40)).sum(axis=0) // 5 % 4).astype(np.uint8)
    im.putdata(arr.ravel().tolist())
    return png(im, transparency=0)


def rgba_png() -> bytes:
    arr = np.asarray(photo(48, 64, seed=3)).copy()
    alpha = np.linspace(0, 255, 64, dtype=np.uint8)[None, :].repeat(48, axis=0)
    return png(Image.fromarray(np.dstack([arr, alpha]), "RGBA"))


def cmyk_jpeg() -> bytes:
    return jpeg(photo(seed=4).convert("CMYK"))


def gray_jpeg() -> bytes:
    return jpeg(photo(seed=5).convert("L"))


def webp() -> bytes:
    return _save(photo(seed=6), "WEBP", quality=80)


# --- Image formats that are not decoded (only JPEG, PNG, WebP, GIF, BMP, TIFF are), under image names.

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)  # written by hand: Pillow would hand it to Ghostscript to rasterise


def other_format(fmt: str) -> bytes:
    """A small image saved by Pillow as ``fmt`` (ICO, PCX, TGA, AVIF, ...)."""
    return _save(photo(32, 32, seed=17), fmt)


def can_save(fmt: str) -> bool:
    try:
        other_format(fmt)
        return True
    except (OSError, KeyError, ValueError):
        return False


# --- EXIF orientation. The image is 16x16 blocks of flat colour, aligned to
# the JPEG block grid and saved without chroma subsampling: every 8x8 DCT
# block is constant, so JPEG encodes a block and its rotation identically and
# the EXIF-rotated file decodes to exactly the pixels of the upright one.


def _blocks_upright() -> Image.Image:
    rng = np.random.default_rng(11)
    cells = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # 8 x 12 cells of 16 px: 128 x 192
    return Image.fromarray(cells.repeat(16, axis=0).repeat(16, axis=1), "RGB")


EXIF_ORIENTATION = 0x0112


def upright_jpeg() -> bytes:
    return jpeg(_blocks_upright(), quality=95, subsampling=0)


def exif_rotated_jpeg(with_tag: bool = True) -> bytes:
    """The upright image stored rotated 90 degrees, with EXIF Orientation 6 (display: rotate back)."""
    stored = _blocks_upright().transpose(Image.Transpose.ROTATE_90)
    kw = {}
    if with_tag:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        kw["exif"] = exif.tobytes()
    return jpeg(stored, quality=95, subsampling=0, **kw)


# --- Palette-exact images: GIF frames and their PNG twins decode to the same pixels.

_PALETTES = {
    "red": [255, 0, 0, 255, 255, 255, 120, 0, 0, 0, 0, 0],
    "blue": [0, 0, 255, 255, 255, 0, 0, 0, 120, 0, 0, 0],
}


def _checker(colours: str, size=(48, 48)) -> Image.Image:
    im = Image.new("P", size, 0)
    im.putpalette(_PALETTES[colours] + [0] * (256 * 3 - 12))
    h, w = size[1], size[0]
    arr = ((np.indices((h, w)) // 8).sum(axis=0) % 3).astype(np.uint8)
    im.putdata(arr.ravel().tolist())
    return im


def animated_gif() -> bytes:
    """Two frames: a red checker, then a blue one. Only the first may be indexed."""
    first, second = _checker("red"), _checker("blue")
    return _save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def gif_first_frame_png() -> bytes:
    return png(_checker("red").convert("RGB"))


def gif_second_frame_png() -> bytes:
    return png(_checker("blue").convert("RGB"))


def solid_png(rgb: tuple[int, int, int], size=(32, 32)) -> bytes:
    return png(Image.new("RGB", size, rgb))


GREEN_PNG = solid_png((20, 200, 40))
BLUE_PNG = solid_png((30, 40, 220))
YELLOW_PNG = solid_png((230, 220, 20))
ORANGE_PNG = solid_png((250, 140, 0))
MAGENTA_JPEG = jpeg(photo(64, 64, seed=9), quality=92)
BLUE_WEBP_LOSSLESS = _save(Image.new("RGB", (32, 32), (30, 40, 220)), "WEBP", lossless=True)


# ---------------------------------------------------------------- tars


def tar_bytes(members: list[tuple[str, bytes]], dirs: tuple[str, ...] = ()) -> bytes:
    """An uncompressed tar of these members in exactly this order (duplicate names allowed),
    directory entries first, ending with the end-of-archive marker."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def write_tar(
    path: Path, members: list[tuple[str, bytes]], dirs: tuple[str, ...] = (), compress: str | None = None
) -> Path:
    """:func:`tar_bytes` written to ``path``; ``compress``: None, ``gz`` or ``bz2`` (the whole
    archive, as ``tar czf`` / ``tar cjf`` do)."""
    data = tar_bytes(members, dirs)
    if compress == "gz":
        data = gzip.compress(data, mtime=0)
    elif compress == "bz2":
        data = bz2.compress(data)
    path.write_bytes(data)
    return path


def member_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


# ---------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expect:
    """What must become of one sample.

    ``outcome`` is ``indexed`` (its id is in the store) or ``rejected`` (one
    dead-letter row with this id, member, stage, reason and error type).
    """

    outcome: str
    stage: str | None = None
    reason: str | None = None
    error_type: str | None = None


INDEXED = Expect("indexed")
UNSAFE_NAME = Expect("rejected", "read", "bad_id", "UnsafeMemberName")


def decode_rejected(reason: str, error_type: str = "DecodeRejected") -> Expect:
    return Expect("rejected", "decode", reason, error_type)


def decode_error(error_type: str) -> Expect:
    return Expect("rejected", "decode", "decode_error", error_type)


@dataclass(frozen=True)
class SampleCase:
    name: str  # the test id
    shard: str  # file name of the shard it is in
    id: str  # the sample id (WebDataset key: path up to the first dot of the file name)
    member: str  # the member the dead-letter row must name (comma list for several members)
    expect: Expect
    note: str = ""


SHARD_A = "a_samples.tar"
SHARD_B = "b_more.tar"

# Tar member order of the sample-level shards. Bad samples first: every
# later good sample shows that a rejection does not stop its shard.
SHARD_A_MEMBERS: list[tuple[str, str, bytes]] = [
    # (case name or "" for a helper sample, member name, data)
    ("truncated_jpeg", "truncated.jpg", truncated_jpeg()),
    ("zero_byte_file", "zero.jpg", zero_bytes()),
    ("random_bytes_as_jpg", "random.jpg", random_bytes()),
    ("text_named_png", "caption.png", text_file()),
    ("png_bomb_30000", "bomb_png.png", png_bomb()),
    ("jpeg_bomb_30000", "bomb_jpg.jpg", jpeg_bomb()),
    ("png_144_megapixels", "huge_png.png", png_bomb(OVER_LIMIT_SIDE, OVER_LIMIT_SIDE)),
    ("eps_as_jpg", "eps.jpg", EPS),
    ("ico_as_png", "icon.png", other_format("ICO")),
    ("pcx_as_png", "pcx.png", other_format("PCX")),
    ("tga_as_png", "tga.png", other_format("TGA")),  # TGA has no signature: found by a header-only open
    *([("avif_as_jpg", "avif.jpg", other_format("AVIF"))] if can_save("AVIF") else []),
    ("absolute_member_name", "/abs/x.jpg", jpeg(photo(seed=20))),
    ("dotdot_member_name", "up/../b.jpg", jpeg(photo(seed=21))),
    ("parent_member_name", "../parent.jpg", jpeg(photo(seed=22))),
    ("dot_slash_member_name", "./dot.jpg", jpeg(photo(seed=23))),
    ("double_slash_member_name", "a//b.jpg", jpeg(photo(seed=24))),
    ("dot_component_member_name", "a/./c.jpg", jpeg(photo(seed=25))),
    ("no_image_member", "textonly.txt", b"a sample with a caption and metadata but no image"),
    ("no_image_member", "textonly.json", b'{"caption": "no image here"}'),
    ("duplicate_in_shard_first", "dup.png", YELLOW_PNG),
    ("", "no_extension_member", b"members without an extension belong to no sample"),
    ("one_pixel_png", "pixel.png", one_pixel_png()),
    ("one_pixel_jpeg", "pixel_jpg.jpg", one_pixel_jpeg()),
    ("gray16_png", "gray16.png", gray16_png()),
    ("palette_transparency_png", "palette.png", palette_transparent_png()),
    ("rgba_png", "rgba.png", rgba_png()),
    ("cmyk_jpeg", "cmyk.jpg", cmyk_jpeg()),
    ("gray_jpeg", "gray.jpg", gray_jpeg()),
    ("exif_rotated_jpeg", "exif_rotated.jpg", exif_rotated_jpeg()),
    ("", "upright.jpg", upright_jpeg()),
    ("", "exif_stripped.jpg", exif_rotated_jpeg(with_tag=False)),
    ("webp", "photo_webp.webp", webp()),
    ("animated_gif", "anim.gif", animated_gif()),
    ("", "gif_frame1.png", gif_first_frame_png()),
    ("", "gif_frame2.png", gif_second_frame_png()),
    ("dotted_file_name", "img.v2.final.jpg", jpeg(photo(seed=12))),
    ("subfolder_member", "sub/dir/photo.jpg", jpeg(photo(seed=13))),
    ("dotted_folder_member", "sub.v1/pic.jpg", jpeg(photo(seed=14))),
    ("duplicate_in_shard_second", "dup.png", ORANGE_PNG),
    ("", "ref_yellow.png", YELLOW_PNG),
    ("", "ref_orange.png", ORANGE_PNG),
    # several image members: tar order png, webp, jpg; the jpg wins (first in IMAGE_EXTENSIONS)
    ("several_image_members", "multi.png", GREEN_PNG),
    ("several_image_members", "multi.webp", BLUE_WEBP_LOSSLESS),
    ("several_image_members", "multi.jpg", MAGENTA_JPEG),
    ("several_image_members", "multi.json", b'{"caption": "three images"}'),
    ("", "ref_multi_jpg.jpg", MAGENTA_JPEG),
    ("", "ref_green.png", GREEN_PNG),
    ("", "ref_blue_webp.webp", BLUE_WEBP_LOSSLESS),
    ("duplicate_across_shards", "cross.png", GREEN_PNG),
    ("", "good_last.jpg", jpeg(photo(seed=15))),
]
SHARD_A_DIRS = ("sub/", "sub/dir/", "sub.v1/")

SHARD_B_MEMBERS: list[tuple[str, str, bytes]] = [
    ("duplicate_across_shards", "cross.png", BLUE_PNG),
    ("", "ref_blue.png", BLUE_PNG),
    ("", "b_good.jpg", jpeg(photo(seed=16))),
]

SAMPLE_CASES: list[SampleCase] = [
    SampleCase(
        "truncated_jpeg",
        SHARD_A,
        "truncated",
        "truncated.jpg",
        decode_error("OSError"),
        "LOAD_TRUNCATED_IMAGES is off: never padded with grey",
    ),
    SampleCase("zero_byte_file", SHARD_A, "zero", "zero.jpg", decode_rejected("empty_file")),
    SampleCase("random_bytes_as_jpg", SHARD_A, "random", "random.jpg", decode_error("UnidentifiedImageError")),
    SampleCase("text_named_png", SHARD_A, "caption", "caption.png", decode_error("UnidentifiedImageError")),
    SampleCase(
        "png_bomb_30000",
        SHARD_A,
        "bomb_png",
        "bomb_png.png",
        decode_rejected("too_many_pixels"),
        "declares 30000x30000: refused from the header",
    ),
    SampleCase("jpeg_bomb_30000", SHARD_A, "bomb_jpg", "bomb_jpg.jpg", decode_rejected("too_many_pixels")),
    SampleCase("png_144_megapixels", SHARD_A, "huge_png", "huge_png.png", decode_rejected("too_many_pixels")),
    SampleCase(
        "eps_as_jpg", SHARD_A, "eps", "eps.jpg", decode_rejected("unsupported_format"), "never given to Ghostscript"
    ),
    SampleCase("ico_as_png", SHARD_A, "icon", "icon.png", decode_rejected("unsupported_format")),
    SampleCase("pcx_as_png", SHARD_A, "pcx", "pcx.png", decode_rejected("unsupported_format")),
    SampleCase("tga_as_png", SHARD_A, "tga", "tga.png", decode_rejected("unsupported_format")),
    *(
        [SampleCase("avif_as_jpg", SHARD_A, "avif", "avif.jpg", decode_rejected("unsupported_format"))]
        if can_save("AVIF")
        else []
    ),
    *[
        SampleCase(case, SHARD_A, base_plus_ext(name)[0], name, UNSAFE_NAME, "as tarfile's data filter would refuse")
        for case, name in [
            ("absolute_member_name", "/abs/x.jpg"),
            ("dotdot_member_name", "up/../b.jpg"),
            ("parent_member_name", "../parent.jpg"),
            ("dot_slash_member_name", "./dot.jpg"),
            ("double_slash_member_name", "a//b.jpg"),
            ("dot_component_member_name", "a/./c.jpg"),
        ]
    ],
    SampleCase(
        "no_image_member",
        SHARD_A,
        "textonly",
        "textonly.txt,textonly.json",
        Expect("rejected", "read", "no_image_member", "NoImageMember"),
    ),
    SampleCase("duplicate_in_shard_first", SHARD_A, "dup", "dup.png", INDEXED, "the first occurrence is kept"),
    SampleCase(
        "duplicate_in_shard_second",
        SHARD_A,
        "dup",
        "dup.png",
        Expect("rejected", "read", "duplicate_id", "DuplicateId"),
    ),
    SampleCase("one_pixel_png", SHARD_A, "pixel", "pixel.png", INDEXED),
    SampleCase("one_pixel_jpeg", SHARD_A, "pixel_jpg", "pixel_jpg.jpg", INDEXED),
    SampleCase("gray16_png", SHARD_A, "gray16", "gray16.png", INDEXED),
    SampleCase("palette_transparency_png", SHARD_A, "palette", "palette.png", INDEXED),
    SampleCase("rgba_png", SHARD_A, "rgba", "rgba.png", INDEXED),
    SampleCase("cmyk_jpeg", SHARD_A, "cmyk", "cmyk.jpg", INDEXED),
    SampleCase("gray_jpeg", SHARD_A, "gray", "gray.jpg", INDEXED),
    SampleCase(
        "exif_rotated_jpeg",
        SHARD_A,
        "exif_rotated",
        "exif_rotated.jpg",
        INDEXED,
        "stored upright: tokens equal those of 'upright'",
    ),
    SampleCase("webp", SHARD_A, "photo_webp", "photo_webp.webp", INDEXED),
    SampleCase("animated_gif", SHARD_A, "anim", "anim.gif", INDEXED, "first frame: tokens equal 'gif_frame1'"),
    SampleCase("dotted_file_name", SHARD_A, "img", "img.v2.final.jpg", INDEXED, "key is the name up to the first dot"),
    SampleCase("subfolder_member", SHARD_A, "sub/dir/photo", "sub/dir/photo.jpg", INDEXED),
    SampleCase(
        "dotted_folder_member",
        SHARD_A,
        "sub.v1/pic",
        "sub.v1/pic.jpg",
        INDEXED,
        "dots in folder names do not split the key",
    ),
    SampleCase(
        "several_image_members",
        SHARD_A,
        "multi",
        "multi.jpg",
        INDEXED,
        "png, webp and jpg members: the jpg is used (first of IMAGE_EXTENSIONS)",
    ),
    SampleCase(
        "duplicate_across_shards",
        SHARD_A,
        "cross",
        "cross.png",
        INDEXED,
        "stored in both shards; the index keeps the first segment's row",
    ),
]

# Good helper samples (references for token comparisons, and good samples after bad ones).
HELPER_IDS_A = [base_plus_ext(name)[0] for case, name, _ in SHARD_A_MEMBERS if not case and "." in name]
HELPER_IDS_B = ["ref_blue", "b_good"]


def _write_members(path: Path, members, dirs=()) -> Path:
    return write_tar(path, [(name, data) for _, name, data in members], dirs=dirs)


def write_sample_corpus(root: Path) -> dict[str, Path]:
    """The two shards of sample-level cases; returns {shard file name: path}."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        SHARD_A: _write_members(root / SHARD_A, SHARD_A_MEMBERS, SHARD_A_DIRS),
        SHARD_B: _write_members(root / SHARD_B, SHARD_B_MEMBERS),
    }


def sample_member_bytes(name: str) -> bytes:
    """The bytes written for a (first) member of shard A, e.g. for decoding it directly."""
    return next(data for _, n, data in SHARD_A_MEMBERS if n == name)


# ---------------------------------------------------------------- shard-level cases


@dataclass(frozen=True)
class ShardExpect:
    """``committed`` (commit record with these counts and completeness) or ``failed`` (failure record)."""

    outcome: str
    indexed: int | None = None
    samples_read: int | None = None
    complete: bool | None = None
    error_type: str | None = None
    ids: tuple[str, ...] = ()  # ids that must be in the store


def _numbered_samples(prefix: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i:03d}.jpg", jpeg(photo(48, 64, seed=seed + i))) for i in range(n)]


def _numbered_tar_bytes(prefix: str, n: int, seed: int) -> tuple[bytes, list[tuple[str, int, int]]]:
    data = tar_bytes(_numbered_samples(prefix, n, seed))
    return data, member_offsets(data)


def write_empty_tar(path: Path) -> Path:
    """A valid tar with no members: only the end-of-archive blocks."""
    return write_tar(path, [])


def write_zero_byte_tar(path: Path) -> Path:
    """A 0-byte file named .tar (a failed upload, typically): tarfile says "empty file"."""
    path.write_bytes(b"")
    return path


def write_truncated_mid_member(path: Path) -> Path:
    """Four samples; the file ends in the middle of the third member's data."""
    data, offs = _numbered_tar_bytes("cut", 4, seed=100)
    _, _, data_off = offs[2]
    path.write_bytes(data[: data_off + 300])
    return path


def write_cut_at_boundary(path: Path) -> Path:
    """Four samples; the file ends exactly where the fourth member's header would start
    (no end-of-archive marker)."""
    data, offs = _numbered_tar_bytes("edge", 4, seed=200)
    path.write_bytes(data[: offs[3][1]])
    return path


def write_corrupt_header_mid_archive(path: Path) -> Path:
    """Four samples; the third member's header is overwritten with garbage (bad checksum).

    tarfile treats an invalid header after the first as the end of the archive,
    silently: the two samples after it must not vanish unnoticed.
    """
    data = bytearray(_numbered_tar_bytes("bad", 4, seed=300)[0])
    hdr = member_offsets(bytes(data))[2][1]
    data[hdr : hdr + 512] = random_bytes(512, seed=3)
    path.write_bytes(bytes(data))
    return path


def write_not_a_tar(path: Path) -> Path:
    path.write_bytes(random_bytes(5000, seed=5))
    return path


def write_gzip_tar(path: Path) -> Path:
    return write_tar(path, _numbered_samples("gz", 3, seed=400), compress="gz")


def write_bzip2_tar(path: Path) -> Path:
    return write_tar(path, _numbered_samples("bz", 3, seed=450), compress="bz2")


def write_gzip_truncated(path: Path) -> Path:
    """A .tar.gz of four samples, cut inside the third member's data.

    Compression level 0 (stored deflate blocks) keeps compressed offsets within
    a few bytes of the tar's own, so the cut lands where intended.
    """
    data, offs = _numbered_tar_bytes("gzcut", 4, seed=600)
    _, _, data_off = offs[2]
    size3 = offs[3][1] - data_off
    assert size3 > 1500, size3
    path.write_bytes(gzip.compress(data, compresslevel=0, mtime=0)[: 10 + data_off + 700])
    return path


def write_healthy(path: Path) -> Path:
    return write_tar(path, _numbered_samples("ok", 3, seed=500))


# --- Tar headers that tarfile reads whole, follows by recursion, or fails on with a Python error.


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, 0o644, 1_700_000_000
    return info.tobuf(tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _regular(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + _padded(data)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return f"{n}{body}".encode()


def _pax(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    return _header("././@PaxHeader", len(records), kind) + _padded(records)


END_OF_ARCHIVE = b"\0" * 1024


def write_oversized_long_name(path: Path, first: bool = False) -> Path:
    """A GNU long-name header of 2 MiB (over the 1 MiB limit) naming a JPEG member; after two good
    samples, or (``first``) as the very first header."""
    name = b"n" * (2 << 20) + b".jpg\0"
    bad = _header("././@LongLink", len(name), tarfile.GNUTYPE_LONGNAME) + _padded(name) + _regular("x.jpg", jpeg())
    good = b"".join(_regular(n, d) for n, d in _numbered_samples("long", 2, seed=900))
    path.write_bytes((bad + good if first else good + bad) + END_OF_ARCHIVE)
    return path


def write_pax_chain(path: Path) -> Path:
    """Two good samples, then 3000 pax global headers before one member (tarfile recurses once per header)."""
    good = b"".join(_regular(n, d) for n, d in _numbered_samples("chain", 2, seed=910))
    chain = _pax(_pax_record("comment", "x"), tarfile.XGLTYPE) * 3000
    path.write_bytes(good + chain + _regular("after.jpg", jpeg()) + END_OF_ARCHIVE)
    return path


def write_sparse_truncated(path: Path) -> Path:
    """Two good samples, then an old-style GNU sparse header announcing extension blocks, and the
    file ends (tarfile fails with IndexError)."""
    good = b"".join(_regular(n, d) for n, d in _numbered_samples("sparse", 2, seed=920))
    info = tarfile.TarInfo("s.jpg")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 10
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended: more sparse structures follow in the next block
    block[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(block))[0]
    path.write_bytes(good + bytes(block) + b"\0" * 100)
    return path


def write_sparse_map_malformed(path: Path) -> Path:
    """Two good samples, then a GNU sparse 1.0 member whose map is not numbers (tarfile: ValueError)."""
    good = b"".join(_regular(n, d) for n, d in _numbered_samples("sparsemap", 2, seed=930))
    pax = _pax(_pax_record("GNU.sparse.major", "1") + _pax_record("GNU.sparse.minor", "0"))
    path.write_bytes(good + pax + _regular("s.jpg", b"zz\nxx") + END_OF_ARCHIVE)
    return path


SHARD_CASES: dict[str, tuple[str, object, ShardExpect]] = {
    # case name: (shard file name, writer, expectation)
    "healthy": ("healthy.tar", write_healthy, ShardExpect("committed", 3, 3, True, ids=("ok000", "ok001", "ok002"))),
    "empty_tar": ("empty.tar", write_empty_tar, ShardExpect("committed", 0, 0, True)),
    "zero_byte_tar": ("zero_bytes.tar", write_zero_byte_tar, ShardExpect("failed", error_type="ReadError")),
    "truncated_mid_member": (
        "truncated.tar",
        write_truncated_mid_member,
        ShardExpect("committed", 2, 2, False, ids=("cut000", "cut001")),
    ),
    "cut_at_member_boundary": (
        "cut_at_boundary.tar",
        write_cut_at_boundary,
        ShardExpect("committed", 3, 3, False, ids=("edge000", "edge001", "edge002")),
    ),
    "corrupt_header_mid_archive": (
        "corrupt_header.tar",
        write_corrupt_header_mid_archive,
        ShardExpect("committed", 2, 2, False, ids=("bad000", "bad001")),
    ),
    "not_a_tar": ("not_a_tar.tar", write_not_a_tar, ShardExpect("failed", error_type="ReadError")),
    "missing_file": ("missing.tar", None, ShardExpect("failed", error_type="FileNotFoundError")),
    "gzip_tar": (
        "gzipped.tar.gz",
        write_gzip_tar,
        ShardExpect("committed", 3, 3, True, ids=("gz000", "gz001", "gz002")),
    ),
    # bz2 (and xz) streams end in non-zero bytes: they must not pass for a tar without an end marker
    "bzip2_tar": (
        "bzipped.tar.bz2",
        write_bzip2_tar,
        ShardExpect("committed", 3, 3, True, ids=("bz000", "bz001", "bz002")),
    ),
    "gzip_tar_truncated": (
        "gzip_truncated.tar.gz",
        write_gzip_truncated,
        ShardExpect("committed", 2, 2, False, ids=("gzcut000", "gzcut001")),
    ),
}

SHARD_CASES.update(
    {
        # extension headers over the limits or malformed: the shard ends there, as tar damage
        "oversized_gnu_long_name": (
            "long_name.tar",
            write_oversized_long_name,
            ShardExpect("committed", 2, 2, False, ids=("long000", "long001")),
        ),
        "oversized_first_header": (
            "long_name_first.tar",
            lambda p: write_oversized_long_name(p, first=True),
            ShardExpect("committed", 0, 0, False),
        ),
        "pax_header_chain": (
            "pax_chain.tar",
            write_pax_chain,
            ShardExpect("committed", 2, 2, False, ids=("chain000", "chain001")),
        ),
        "gnu_sparse_truncated": (
            "sparse_truncated.tar",
            write_sparse_truncated,
            ShardExpect("committed", 2, 2, False, ids=("sparse000", "sparse001")),
        ),
        "gnu_sparse_map_malformed": (
            "sparse_map.tar",
            write_sparse_map_malformed,
            ShardExpect("committed", 2, 2, False, ids=("sparsemap000", "sparsemap001")),
        ),
    }
)

PERMISSION_CASE = ("permission_denied", "no_permission.tar", ShardExpect("failed", error_type="PermissionError"))


def write_shard_corpus(root: Path, permission_case: bool) -> dict[str, Path]:
    """Every shard-level case; returns {case name: path}. Missing files are not created."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for case, (fname, writer, _) in SHARD_CASES.items():
        out[case] = root / fname
        if writer is not None:
            writer(root / fname)
    if permission_case:
        name, fname, _ = PERMISSION_CASE
        path = write_healthy(root / fname)
        os.chmod(path, 0)
        out[name] = path
    return out


def write_unreadable_corpus(root: Path) -> list[Path]:
    """Only shards that cannot be read: a missing path and a file that is not a tar."""
    root.mkdir(parents=True, exist_ok=True)
    return [root / "nowhere.tar", write_not_a_tar(root / "garbage.tar")]


# ---------------------------------------------------------------- memory cases
#
# Small files that used to make a worker hold far more memory than their size
# (tests/test_hostile_memory.py measures the peak RSS of indexing each one).
# They are written as streams, so that building them holds little memory too.

MIB = 1 << 20


class _TarStream:
    """Writes a tar stream through gzip, member by member, from repeated bytes."""

    def __init__(self, path: Path):
        self._f = gzip.GzipFile(path, "wb", compresslevel=1, mtime=0)

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def fill(self, pattern: bytes, n: int) -> None:
        """Exactly ``n`` bytes of ``pattern``, repeated."""
        chunk = (pattern * (MIB // len(pattern) + 1))[:MIB]
        while n > 0:
            self._f.write(chunk[: min(n, MIB)])
            n -= MIB

    def pad(self, size: int) -> None:
        """The zeros that complete the last 512-byte block of ``size`` bytes of member data."""
        self._f.write(b"\0" * (-size % tarfile.BLOCKSIZE))

    def header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode, info.mtime = size, kind, 0o644, 1_700_000_000
        self._f.write(info.tobuf(tarfile.USTAR_FORMAT))

    def member(self, name: str, data: bytes = b"", size: int | None = None) -> None:
        """A regular member: ``data``, then zeros up to ``size`` bytes."""
        size = len(data) if size is None else size
        self.header(name, size)
        self._f.write(data)
        self.fill(b"\0", size - len(data))
        self.pad(size)

    def close(self) -> None:
        self._f.write(b"\0" * 1024)
        self._f.close()


def small_jpeg(seed: int) -> bytes:
    return jpeg(photo(48, 64, seed=seed))


def write_normal_shard(path: Path, n: int = 12, seed: int = 700) -> Path:
    """The reference: ``n`` ordinary small JPEG samples, gzip'd like the memory cases."""
    t = _TarStream(path)
    for i in range(n):
        t.member(f"n{i:03d}.jpg", small_jpeg(seed + i))
    t.close()
    return path


# Image members of one sample in ascending rank (each outranks the one before it: the worst
# case for "read an image member only if it outranks the one held").
RANKS_ASCENDING = ("tiff", "tif", "bmp", "gif", "webp", "png", "jpeg", "jpg")
BIG_MEMBER = 50 * MIB


def write_many_image_members(path: Path) -> Path:
    """Two samples of eight 50 MiB zero image members each (~1 MB gzip'd): ``same`` has eight
    ``.jpg`` members (``same.v0.jpg`` ...), ``ranks`` one of each image extension, lowest rank
    first. Both are rejected (zeros are no image); the samples around them are indexed."""
    t = _TarStream(path)
    t.member("before.jpg", small_jpeg(1))
    for i in range(8):
        t.member(f"same.v{i}.jpg", size=BIG_MEMBER)
    for ext in RANKS_ASCENDING:
        t.member(f"ranks.{ext}", size=BIG_MEMBER)
    t.member("after.jpg", small_jpeg(2))
    t.close()
    return path


LONG_HEADER = 256 * MIB


def write_gnu_long_name(path: Path, size: int = LONG_HEADER) -> Path:
    """A good sample, then a GNU long-name header of ``size`` bytes (~0.5 MB gzip'd) naming a
    small JPEG member, then another good sample. tarfile reads such a header whole."""
    t = _TarStream(path)
    t.member("first.jpg", small_jpeg(3))
    t.header("././@LongLink", size + 1, tarfile.GNUTYPE_LONGNAME)
    t.fill(b"a", size - 4)
    t.write(b".jpg\0")
    t.pad(size + 1)
    t.member("ignored.jpg", small_jpeg(4))
    t.member("last.jpg", small_jpeg(5))
    t.close()
    return path


def write_pax_header(path: Path, size: int = LONG_HEADER) -> Path:
    """A good sample, then a pax extended header of about ``size`` bytes (one ``comment``
    record) before a small JPEG member, then another good sample."""
    t = _TarStream(path)
    t.member("first.jpg", small_jpeg(6))
    fixed = len(" comment=\n")
    digits = len(str(size + fixed))
    length = size + fixed + digits  # a pax record's length counts its own digits
    assert len(str(length)) == digits
    t.header("././@PaxHeader", length, tarfile.XHDTYPE)
    t.write(f"{length} comment=".encode())
    t.fill(b"c", size)
    t.write(b"\n")
    t.pad(length)
    t.member("ignored.jpg", small_jpeg(7))
    t.member("last.jpg", small_jpeg(8))
    t.close()
    return path


def write_prefetch_window(path: Path, n: int = 12, size: int = 48 * MIB) -> Path:
    """``n`` valid small JPEGs, each followed by zero padding up to ``size`` bytes (decoders stop at
    the end of the image, so they decode): the decode window and the batches used to hold them."""
    t = _TarStream(path)
    for i in range(n):
        t.member(f"padded{i:03d}.jpg", small_jpeg(800 + i), size=size)
    t.close()
    return path


def gif_frames_bomb(side: int = 1024, frames: int = 300) -> bytes:
    """A ~7 KB GIF: a ``side`` x ``side`` screen and ``frames`` frames of one pixel each.
    Decoding every frame at screen size takes ``frames * side * side * 3`` bytes (900 MiB)."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", side, side) + bytes([0x80, 0, 0]) + bytes([255, 0, 0, 0, 0, 255]))
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x05\x00\x00\x00"  # graphic control: 50 ms
        out += b"\x2c" + struct.pack("<HHHH", i % side, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return bytes(out + b";")


def write_gif_frames(path: Path) -> Path:
    t = _TarStream(path)
    t.member("first.jpg", small_jpeg(9))
    t.member("frames.gif", gif_frames_bomb())
    t.member("last.jpg", small_jpeg(10))
    t.close()
    return path
