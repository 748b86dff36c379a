"""Thumbnails of rejected images, read back from their source shards (for the HTML report).

Rejected images are hostile by definition (truncated, bombs, not images at
all), so nothing here may hang, exhaust memory or raise: each image is
looked at only after its header says it is small enough, is decoded in a
daemon thread with a time limit, and every failure becomes a placeholder
that says why (``Thumbnail.note``). Each shard is opened once and read only
up to the last member wanted; the whole pass has a time budget.
"""

from __future__ import annotations

import base64
import io
import re
import tarfile
import threading
import time
import warnings
from dataclasses import dataclass

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
SIZE = 112  # pixels, the longer side
MAX_MEMBER_BYTES = 64 << 20
MAX_PIXELS = 40_000_000  # declared in the header; bigger ones are not decoded (bombs are rejected for this)
DECODE_TIMEOUT_S = 3.0
BUDGET_S = 15.0  # for all thumbnails of one report


@dataclass
class Thumbnail:
    data_uri: str | None  # data:image/...;base64 (None: show a placeholder)
    note: str  # what was shown, or why there is no picture


def _image_member(member: str | None) -> str | None:
    """The member of a dead-letter row to show: the first of its (comma-separated) names that is an image."""
    for name in (member or "").split(","):
        if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return name
    return None


def _decode(data: bytes) -> Thumbnail:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                return Thumbnail(None, f"{im.format} declares {w}x{h} pixels: not decoded")
            if im.format == "JPEG":
                im.draft("RGB", (SIZE, SIZE))
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGBA").convert("RGB") if "A" in im.getbands() else im.convert("RGB")
            im.thumbnail((SIZE, SIZE))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), f"{w}x{h}")
    except Exception as e:  # noqa: BLE001 -- a broken image is a placeholder, never a broken report
        message = re.sub(r"<[^>]* at 0x[0-9a-f]+>", "the data", str(e))  # no memory addresses in the page
        return Thumbnail(None, f"cannot decode: {type(e).__name__}: {message[:120]}")


def decode_with_timeout(data: bytes, timeout_s: float = DECODE_TIMEOUT_S) -> Thumbnail:
    if not data:
        return Thumbnail(None, "empty file")
    box: list[Thumbnail] = []
    worker = threading.Thread(target=lambda: box.append(_decode(data)), daemon=True, name="thumbnail")
    worker.start()
    worker.join(timeout_s)
    return box[0] if box else Thumbnail(None, f"decoding took over {timeout_s:.0f} s")


def _read_members(url: str, wanted: dict[str, set[int]], deadline: float) -> dict[tuple[str, int], Thumbnail | str]:
    """(member, occurrence) -> its thumbnail, or a note, for the wanted occurrences (1 = first) of members of
    one shard (each decoded as soon as it is read, so one member's bytes are held at a time)."""
    from edje_indexer.schemas.storage import filesystem

    out: dict[tuple[str, int], Thumbnail | str] = {}
    seen: dict[str, int] = {}
    last = {(m, k) for m, ks in wanted.items() for k in ks}
    try:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            while len(out) < len(last) and time.monotonic() < deadline:
                try:
                    info = tf.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    note = f"shard unreadable past here: {type(e).__name__}"
                    return {key: out.get(key, note) for key in last}
                if info is None:
                    break
                if not info.isfile() or info.name not in wanted:
                    continue
                seen[info.name] = seen.get(info.name, 0) + 1
                key = (info.name, seen[info.name])
                if key not in last:
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    out[key] = f"member of {info.size} bytes: not read"
                    continue
                fobj = tf.extractfile(info)
                out[key] = decode_with_timeout(fobj.read()) if fobj is not None else "not a regular file"
    except Exception as e:  # noqa: BLE001 -- a missing or broken shard: placeholders
        note = f"source shard not readable: {type(e).__name__}: {str(e)[:100]}"
        return {key: out.get(key, note) for key in last}
    for key in last:
        out.setdefault(key, "member not found in the shard" if time.monotonic() < deadline else "time budget spent")
    return out


def thumbnails(rows: list[dict], budget_s: float = BUDGET_S) -> list[Thumbnail]:
    """A thumbnail (or placeholder) for each dead-letter row (``shard``, ``member``, ``reason``), in order."""
    deadline = time.monotonic() + budget_s
    result: list[Thumbnail | None] = [None] * len(rows)
    by_shard: dict[str, dict[str, set[int]]] = {}
    keys: list[tuple[str, str, int] | None] = []
    for i, row in enumerate(rows):
        member = _image_member(row.get("member"))
        if member is None:
            result[i] = Thumbnail(None, "no image member")
            keys.append(None)
            continue
        # the rejected one of two same-named members is the later (duplicate_id keeps the first)
        occurrence = 2 if row.get("reason") == "duplicate_id" else 1
        by_shard.setdefault(row["shard"], {}).setdefault(member, set()).add(occurrence)
        keys.append((row["shard"], member, occurrence))
    with warnings.catch_warnings():  # Pillow warns of big images (DecompressionBombWarning): they are noted
        warnings.simplefilter("ignore")
        return _decode_all(result, keys, by_shard, deadline)


def _decode_all(result, keys, by_shard, deadline) -> list[Thumbnail]:
    read = {shard: _read_members(shard, wanted, deadline) for shard, wanted in by_shard.items()}
    for i, key in enumerate(keys):
        if key is None:
            continue
        shard, member, occurrence = key
        got = read[shard].get((member, occurrence), "member not found in the shard")
        result[i] = Thumbnail(None, got) if isinstance(got, str) else got
    return result
