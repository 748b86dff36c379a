"""Image-text pairs from packages: Tux Paint stamps, Google's emoji images, Openclipart.

Each reader walks an unpacked package folder (``make quality-data`` unpacks them under ``quality/src``;
an installed system copy works too) and yields :class:`Pair` records: an image file, its caption and
a category. Nothing here decodes images (training/data.py does).

* Tux Paint (Debian ``tuxpaint-stamps-default``, GPL-2): ``stamps/<category>/.../<name>.png`` with
  ``<name>.txt`` beside it, whose first line is an English sentence ("A Tamworth pig."). The
  ``*_mirror``/``*_flip`` PNGs are pre-rendered variants of another stamp and are skipped.
* Emoji (npm ``emoji-datasource-google``, Apache-2.0 images): ``emoji.json`` gives each emoji's name
  ("HEART HANDS") and category; the image is ``img/google/64/<image>``. Skin-tone variants are not
  separate entries there, so each emoji is one pair.
* Openclipart (Debian ``openclipart-png``, public domain): the caption is the file name
  ("light_bulb_karl_bartel_01" -> "light bulb karl bartel"; the names often end in a truncated author
  name, hence "noisy") followed by the folder ("electronics bulb"). Folders whose file names describe
  nothing (``shapes/``: "star_95pt06step"; ``special/``: gradients and patterns; ``computer/icons/``:
  theme icon names like "gnome-mime-text") and symbolic links (the same file listed twice) are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

OPENCLIPART_SKIPPED = ("shapes", "special", "computer/icons")
_TRAILING_NUMBER = re.compile(r"[_\-\s]+\d+$")


@dataclass(frozen=True)
class Pair:
    id: str  # the WebDataset key: source/path without dots (the key ends at the first dot of a file name)
    path: str  # the image file
    caption: str
    source: str  # "tuxpaint", "emoji", "openclipart"
    category: str

    def to_dict(self) -> dict:
        return asdict(self)


def _key(*parts: str) -> str:
    # a dot would end the WebDataset key early; spaces are legal but awkward on a command line
    return "/".join(re.sub(r"[^A-Za-z0-9_\-/]", "_", p) for p in parts)


def tuxpaint_pairs(stamps_dir: str) -> Iterator[Pair]:
    """The stamps under ``stamps_dir`` (.../share/tuxpaint/stamps) with their English description."""
    if not os.path.isdir(stamps_dir):
        raise FileNotFoundError(f"no Tux Paint stamps folder {stamps_dir} (make quality-data unpacks it)")
    for root, dirs, files in os.walk(stamps_dir):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext != ".png" or stem.endswith(("_mirror", "_flip")):
                continue
            txt = os.path.join(root, stem + ".txt")
            if not os.path.isfile(txt):
                continue
            with open(txt, encoding="utf-8", errors="replace") as f:
                caption = f.readline().strip()
            if not caption:
                continue
            rel = os.path.relpath(os.path.join(root, stem), stamps_dir)
            yield Pair(_key("tuxpaint", rel), os.path.join(root, name), caption, "tuxpaint", rel.split(os.sep)[0])


def emoji_pairs(package_dir: str) -> Iterator[Pair]:
    """The emoji of an unpacked ``emoji-datasource-google`` (the folder holding ``emoji.json``)."""
    index = os.path.join(package_dir, "emoji.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no {index} (make quality-data unpacks emoji-datasource-google)")
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    for e in sorted(entries, key=lambda e: e["image"]):
        path = os.path.join(package_dir, "img", "google", "64", e["image"])
        if not e.get("has_img_google") or not e.get("name") or not os.path.isfile(path):
            continue
        stem = os.path.splitext(e["image"])[0]
        yield Pair(_key("emoji", stem), path, e["name"].lower(), "emoji", e.get("category") or "")


def openclipart_title(file_name: str) -> str:
    """``"light_bulb_karl_bartel_01.png"`` -> ``"light bulb karl bartel"``."""
    stem = os.path.splitext(file_name)[0]
    while _TRAILING_NUMBER.search(stem):
        stem = _TRAILING_NUMBER.sub("", stem)
    return " ".join(re.split(r"[_\-\s]+", stem)).strip()


def openclipart_pairs(png_dir: str) -> Iterator[Pair]:
    """The PNGs under ``png_dir`` (.../share/openclipart/png), captioned by file name and folder."""
    if not os.path.isdir(png_dir):
        raise FileNotFoundError(f"no Openclipart folder {png_dir} (make quality-data unpacks it)")
    for root, dirs, files in os.walk(png_dir):
        dirs.sort()
        folder = os.path.relpath(root, png_dir).replace(os.sep, "/")
        if folder != "." and any(folder == s or folder.startswith(s + "/") for s in OPENCLIPART_SKIPPED):
            continue
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.endswith(".png") or os.path.islink(path):
                continue
            title = openclipart_title(name)
            if not title:
                continue
            where = "" if folder == "." else folder.replace("/", " ").replace("_", " ")
            caption = f"{title} ({where})" if where else title
            rel = os.path.splitext(os.path.relpath(path, png_dir))[0]
            yield Pair(_key("openclipart", rel), path, caption, "openclipart", folder.split("/")[0])
