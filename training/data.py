"""The quality corpus: WebDataset shards of the packaged image-text pairs, plus a captions table.

``python -m edje_indexer.training.data --out quality/data --tuxpaint DIR --emoji DIR --openclipart DIR``
(what ``make quality-data`` runs) writes::

    quality/data/train-000000.tar ...   70% of each source: what training sees
    quality/data/test-000000.tar ...    the other 30%: held out, seen by no training step
    quality/data/captions.jsonl         one {"id", "caption", "source", "category", "split"} per image
    quality/data/manifest.json          counts, shard patterns, the split rule, what was skipped

The split is a fixed :data:`TEST_FRACTION` (30%) of the pooled images, by a hash of the image id (the
same on every machine and run, whatever else is added), so each source is held out in about that share.
Holding out a whole source instead (all Tux Paint stamps) was tried: the first stage then finds the
right stamp for a Tux Paint sentence only 3% of the time (R@1; R@10 13%), because nothing in training is
captioned in sentences, which leaves a reranker of its top 10 almost nothing to work with.

A shard sample is ``<id>.png`` + ``<id>.json`` (``{"caption", "source", "category"}``), the layout
transforms/shards.py reads (the key is the member path up to the first dot of its file name). The
images are stored as they would be shown: transparent pixels flattened onto white (the indexer drops
alpha, and what lies under a stamp's transparent pixels is arbitrary), downscaled so the longer side
is at most ``max_side`` (default 256; the models read 224 px), as RGB PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence

from PIL import Image

from edje_indexer.training.sources import Pair, emoji_pairs, openclipart_pairs, tuxpaint_pairs

TEST_FRACTION = 0.3
SHARD_SIZE = 512
MAX_SIDE = 256
MAX_SOURCE_PIXELS = 50_000_000  # a few Openclipart PNGs are 200+ megapixels: skipped rather than decoded
CAPTIONS_NAME = "captions.jsonl"
MANIFEST_NAME = "manifest.json"


def flattened_png(path: str, max_side: int = MAX_SIDE) -> bytes:
    """The image at ``path`` on a white background, longer side at most ``max_side``, as RGB PNG bytes."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels, more than {MAX_SOURCE_PIXELS:,}")
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return buf.getvalue()


def shard_pattern(out_dir: str, split: str, count: int) -> str:
    """The brace pattern ``edje-index index --input`` takes for a split's ``count`` shards."""
    if count == 1:
        return os.path.join(out_dir, f"{split}-000000.tar")
    return os.path.join(out_dir, f"{split}-{{000000..{count - 1:06d}}}.tar")


def is_test(image_id: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Whether an image is in the held-out split: a fixed hash of its id."""
    import hashlib

    return int(hashlib.sha256(("split:" + image_id).encode()).hexdigest()[:8], 16) % 10_000 < test_fraction * 10_000


def write_split(
    pairs: Iterable[Pair], out_dir: str, split: str, max_side: int = MAX_SIDE, shard_size: int = SHARD_SIZE
) -> tuple[list[dict], list[str], list[dict]]:
    """Write one split's shards; returns (captions rows, shard paths, skipped images with the reason)."""
    from webdataset import TarWriter

    rows, shards, skipped, seen = [], [], [], set()
    writer = None
    for pair in pairs:
        if pair.id in seen:
            skipped.append({"id": pair.id, "path": pair.path, "reason": "duplicate id"})
            continue
        try:
            png = flattened_png(pair.path, max_side)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a package's unusable file: skip, say so
            skipped.append({"id": pair.id, "path": pair.path, "reason": f"{type(e).__name__}: {e}"})
            continue
        seen.add(pair.id)
        if writer is None or len(rows) % shard_size == 0:
            if writer is not None:
                writer.close()
            shards.append(os.path.join(out_dir, f"{split}-{len(shards):06d}.tar"))
            writer = TarWriter(shards[-1])
        meta = {"caption": pair.caption, "source": pair.source, "category": pair.category}
        writer.write({"__key__": pair.id, "png": png, "json": json.dumps(meta).encode()})
        rows.append({"id": pair.id, **meta, "split": split})
    if writer is not None:
        writer.close()
    return rows, shards, skipped


def build_corpus(
    out_dir: str,
    pairs: Sequence[Pair],
    max_side: int = MAX_SIDE,
    shard_size: int = SHARD_SIZE,
    test_fraction: float = TEST_FRACTION,
    progress: bool = False,
) -> dict:
    """Write both splits of ``pairs`` into ``out_dir``; returns the manifest (also written)."""
    os.makedirs(out_dir, exist_ok=True)
    by_split = {
        "train": [p for p in pairs if not is_test(p.id, test_fraction)],
        "test": [p for p in pairs if is_test(p.id, test_fraction)],
    }
    rule = f"test = a fixed {test_fraction:.0%} of the pooled images (hash of the id); train = the rest"
    manifest = {"split_rule": rule, "splits": {}}
    all_rows = []
    for split, items in by_split.items():
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"shards ({split})", unit="img", file=sys.stderr)
        rows, shards, skipped = write_split(items, out_dir, split, max_side, shard_size)
        all_rows += rows
        manifest["splits"][split] = {
            "images": len(rows),
            "shards": len(shards),
            "pattern": shard_pattern(out_dir, split, len(shards)) if shards else None,
            "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
            "skipped": skipped,
        }
    with open(os.path.join(out_dir, CAPTIONS_NAME), "w", encoding="utf-8") as f:
        for r in all_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    manifest["max_side"], manifest["shard_size"] = max_side, shard_size
    with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_captions(data_dir: str, split: str | None = None) -> list[dict]:
    """The captions table of a corpus folder (rows of one split, or all)."""
    with open(os.path.join(data_dir, CAPTIONS_NAME), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no corpus in {data_dir} (no {MANIFEST_NAME}): run make quality-data")
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edje_indexer.training.data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the shards and the captions table")
    p.add_argument("--tuxpaint", help="Tux Paint stamps folder (.../share/tuxpaint/stamps)")
    p.add_argument("--emoji", help="unpacked emoji-datasource-google (the folder with emoji.json)")
    p.add_argument("--openclipart", help="Openclipart PNG folder (.../share/openclipart/png)")
    p.add_argument("--max-side", type=int, default=MAX_SIDE)
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE)
    args = p.parse_args(argv)
    pairs: list[Pair] = []
    if args.tuxpaint:
        pairs += tuxpaint_pairs(args.tuxpaint)
    if args.emoji:
        pairs += emoji_pairs(args.emoji)
    if args.openclipart:
        pairs += openclipart_pairs(args.openclipart)
    if not pairs:
        p.error("no source given: pass at least one of --tuxpaint, --emoji, --openclipart")
    manifest = build_corpus(args.out, pairs, args.max_side, args.shard_size, progress=True)
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['images']} images in {s['shards']} shards {s['sources']}, {len(s['skipped'])} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
