"""Shared fixtures: tiny shards built from packaged photos, and the tiny model."""

from __future__ import annotations

import json
import os

import pytest
from helpers import image_bytes, write_tar
from PIL import Image

from edje_indexer.pipeline.demo import packaged_photos


@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory):
    """Readers of object stores cache id index runs here, not in the user's ~/.cache."""
    import os

    folder = str(tmp_path_factory.mktemp("index-cache"))
    os.environ["EDJE_INDEX_CACHE"] = folder
    return folder


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, Image.Image]]:
    """A few real photos, downsized so tests stay fast."""
    out = []
    for name, path in packaged_photos()[:8]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            out.append((name, im.copy()))
    return out


@pytest.fixture
def corpus(tmp_path, photos):
    """3 shards of 4 samples each (jpg/png/webp), plus one bad sample in shard 1.

    Returns (pattern, {id: image bytes}, list of bad ids).
    """
    folder = tmp_path / "corpus"
    folder.mkdir()
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    images = {}
    for s in range(3):
        members = []
        for i in range(4):
            name, im = photos[(s * 4 + i) % len(photos)]
            ext, fmt = formats[(s + i) % 3]
            key = f"s{s}-{i:03d}-{name}"
            data = image_bytes(im.rotate(15 * i) if s else im, fmt)
            images[key] = data
            members += [(f"{key}.{ext}", data), (f"{key}.json", json.dumps({"n": i}).encode())]
        if s == 1:
            members.append(("s1-bad.jpg", b"\xff\xd8\xff not really a jpeg"))
        write_tar(folder / f"shard-{s:06d}.tar", members)
    return str(folder / "shard-{000000..000002}.tar"), images, ["s1-bad"]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session; AWS_* variables point every client at it.

    Yields a function ``bucket(name)`` that creates a fresh bucket and returns ``s3://name``."""
    import uuid

    import s3_server

    server = s3_server.start(str(tmp_path_factory.mktemp("seaweedfs")))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)

    def bucket(prefix: str = "b") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        fs.mkdir(name)
        return f"s3://{name}"

    try:
        yield bucket
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
