"""A small demo corpus of real photos, from images that ship inside PyPI packages.

scikit-image and scikit-learn carry a few sample photographs; the demo writes
them at several sizes and formats into WebDataset shards with webdataset's
own TarWriter. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

from PIL import Image

SOURCES = {
    "skimage": (
        "data",
        [
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "rocket.jpg",
            "hubble_deep_field.jpg",
            "retina.jpg",
            "motorcycle_left.png",
            "camera.png",
        ],
    ),
    "sklearn": ("datasets/images", ["china.jpg", "flower.jpg"]),
}
VARIANTS = [(640, "jpg"), (320, "png"), (1024, "webp")]  # (width, format)


def packaged_photos() -> list[tuple[str, str]]:
    """(name, path) of the sample photos that the installed packages carry."""
    out = []
    for pkg, (sub, names) in SOURCES.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = os.path.join(list(spec.submodule_search_locations)[0], sub)
        out += [
            (f"{pkg}-{n.rsplit('.', 1)[0]}", os.path.join(folder, n))
            for n in names
            if os.path.exists(os.path.join(folder, n))
        ]
    if not out:
        raise FileNotFoundError("no packaged sample photos found: pip install scikit-image scikit-learn")
    return out


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.convert("RGB").save(buf, "JPEG", quality=90)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=85)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def build_demo_corpus(out_dir: str, shards: int = 3) -> list[str]:
    """Write ``shards`` tar shards of every photo x variant; returns their paths."""
    from webdataset import TarWriter

    os.makedirs(out_dir, exist_ok=True)
    samples = []
    for name, path in packaged_photos():
        with Image.open(path) as src:
            src.load()
            for width, fmt in VARIANTS:
                h = max(1, round(src.height * width / src.width))
                im = src.resize((width, h), Image.Resampling.LANCZOS)
                key = f"{name}-w{width}"
                samples.append(
                    {
                        "__key__": key,
                        fmt: encode(im, fmt),
                        "json": json.dumps(
                            {"source": os.path.basename(path), "width": width, "height": h, "format": fmt}
                        ).encode(),
                    }
                )
    paths = []
    for s in range(shards):
        path = os.path.join(out_dir, f"demo-{s:06d}.tar")
        with TarWriter(path) as w:
            for sample in samples[s::shards]:
                w.write(sample)
        paths.append(path)
    return paths
