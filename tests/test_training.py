"""training/ and benchmarks/quality.py on tiny generated data: the package readers, the corpus shards, the
metrics, the ridge first stage, the training entry point and the quality benchmark's whole code path.

The real run (make quality) uses the DINOv2 backbone and all-MiniLM-L6-v2; here the backbone is the ``tiny``
preset's random ViT and the text model a 2-layer random BERT written below, so a few steps take seconds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from edje_indexer.training import data, sources
from edje_indexer.training.first_stage import RidgeMap, cross_fitted_embeddings, fit_ridge
from edje_indexer.training.metrics import agreement, kendall_tau, recall, top_k

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ["a", "the", "big", "small", "picture", "of", "stamp", *COLOURS, *SHAPES, "face", "flag", "star", "tree"]


def shape_image(colour: str, shape: str, size: int = 48, transparent: bool = True) -> Image.Image:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0) if transparent else (255, 255, 255, 255))
    dr, c, box = ImageDraw.Draw(im), COLOURS[colour] + (255,), (6, 6, size - 6, size - 6)
    if shape == "circle":
        dr.ellipse(box, fill=c)
    elif shape == "square":
        dr.rectangle(box, fill=c)
    else:
        dr.polygon([(size // 2, 4), (size - 4, size - 4), (4, size - 4)], fill=c)
    return im


@pytest.fixture
def package_trees(tmp_path):
    """Miniatures of the three packages' layouts (as make quality-data unpacks them)."""
    stamps = tmp_path / "tux" / "stamps"
    (stamps / "animals" / "birds").mkdir(parents=True)
    shape_image("red", "circle").save(stamps / "animals" / "birds" / "robin.png")
    (stamps / "animals" / "birds" / "robin.txt").write_text("A red robin.\nfr.utf8=Un rouge-gorge.\n")
    shape_image("red", "circle").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        stamps / "animals" / "birds" / "robin_mirror.png"
    )  # a pre-rendered variant: skipped
    (stamps / "town").mkdir()
    shape_image("blue", "square").save(stamps / "town" / "v1.2.png")  # a dot in the name: not in the key
    (stamps / "town" / "v1.2.txt").write_text("A blue house.\n")
    shape_image("green", "square").save(stamps / "town" / "no_description.png")  # no .txt: skipped
    emoji = tmp_path / "emoji" / "package"
    (emoji / "img" / "google" / "64").mkdir(parents=True)
    entries = [
        {"name": "GRINNING FACE", "image": "1f600.png", "category": "Smileys & Emotion", "has_img_google": True},
        {"name": "Japan Flag", "image": "1f1ef-1f1f5.png", "category": "Flags", "has_img_google": True},
        {"name": "NO GOOGLE IMAGE", "image": "0000.png", "category": "Symbols", "has_img_google": False},
    ]
    (emoji / "emoji.json").write_text(json.dumps(entries))
    for e in entries[:2]:
        shape_image("yellow", "circle", 64).save(emoji / "img" / "google" / "64" / e["image"])
    clip = tmp_path / "openclipart" / "png"
    for folder in ("animals/mammals", "shapes/stars", "computer/icons/x", "computer"):
        (clip / folder).mkdir(parents=True, exist_ok=True)
    shape_image("green", "triangle").save(clip / "animals" / "mammals" / "canguro_architetto_franc_01.png")
    shape_image("yellow", "triangle").save(clip / "shapes" / "stars" / "star_95pt06step.png")  # skipped folder
    shape_image("blue", "circle").save(clip / "computer" / "icons" / "x" / "gnome-mime-text.png")  # skipped
    os.symlink(clip / "animals" / "mammals" / "canguro_architetto_franc_01.png", clip / "computer" / "link.png")
    return stamps, emoji, clip


def test_package_readers(package_trees):
    stamps, emoji, clip = package_trees
    tux = list(sources.tuxpaint_pairs(str(stamps)))
    assert [(p.id, p.caption, p.category) for p in tux] == [
        ("tuxpaint/animals/birds/robin", "A red robin.", "animals"),
        ("tuxpaint/town/v1_2", "A blue house.", "town"),
    ]
    emo = list(sources.emoji_pairs(str(emoji)))
    assert [(p.id, p.caption, p.category) for p in emo] == [
        ("emoji/1f1ef-1f1f5", "japan flag", "Flags"),
        ("emoji/1f600", "grinning face", "Smileys & Emotion"),
    ]
    oc = list(sources.openclipart_pairs(str(clip)))
    assert [(p.id, p.caption) for p in oc] == [
        ("openclipart/animals/mammals/canguro_architetto_franc_01", "canguro architetto franc (animals mammals)")
    ]
    assert sources.openclipart_title("light_bulb_karl_bartel_01.png") == "light bulb karl bartel"
    assert sources.openclipart_title("jigsaw-green-04_2.png") == "jigsaw green"
    with pytest.raises(FileNotFoundError, match="quality-data"):
        list(sources.tuxpaint_pairs(str(stamps / "nope")))


def test_corpus_shards_are_what_the_indexer_reads(package_trees, tmp_path):
    from edje_indexer.pipeline.plan import expand_pattern
    from edje_indexer.transforms.shards import Sample, ShardReadStats, iter_shard

    stamps, emoji, clip = package_trees
    pairs = [*sources.tuxpaint_pairs(str(stamps)), *sources.emoji_pairs(str(emoji))]
    pairs += sources.openclipart_pairs(str(clip))
    out = str(tmp_path / "corpus")
    # the split is a fixed hash of the id: 40% here, so that both splits get some of 5 images
    manifest = data.build_corpus(out, pairs, max_side=32, shard_size=2, test_fraction=0.4)
    rows = data.read_captions(out)
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in pairs)
    for r in rows:
        assert r["split"] == ("test" if data.is_test(r["id"], 0.4) else "train")
    for split, info in manifest["splits"].items():
        n = sum(r["split"] == split for r in rows)
        assert info["images"] == n and info["shards"] == (n + 1) // 2 and n > 0
    seen = {}
    for url in [u for s in manifest["splits"].values() for u in expand_pattern(s["pattern"])]:
        for s in iter_shard(url, "key", ShardReadStats()):
            assert isinstance(s, Sample), s
            seen[s.id] = s
    assert sorted(seen) == sorted(r["id"] for r in rows)
    import io

    im = Image.open(io.BytesIO(seen["tuxpaint/animals/birds/robin"].data))
    assert im.mode == "RGB" and max(im.size) == 32
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corner flattened onto white
    assert im.getpixel((16, 16))[0] > 200 > im.getpixel((16, 16))[1]  # the red disc


def test_metrics():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 1, 2]]  # ties: lower index first
    assert recall([[1, 3, 2], [0, 1, 2]], [{2}, {0}], ks=(1, 3)) == {"r1": 0.5, "r3": 1.0}
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    a = agreement([[0, 1], [1, 0]], [[0, 1], [0, 1]], [[2, 1], [1, 2]], [[2, 1], [2, 1]])
    assert a == {"top1": 0.5, "kendall_tau": 0.0}


def test_ridge_first_stage(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    w = rng.standard_normal((12, 6))
    t = (x @ w + 0.3).astype(np.float32)
    ridge = fit_ridge(x, t, 1e-4)
    emb = ridge.embed(x)  # unit vectors
    assert ((emb * t).sum(1) / np.linalg.norm(t, axis=1)).min() > 0.999  # a linear relation is recovered
    path = str(tmp_path / "fs.safetensors")
    ridge.save(path)
    again = RidgeMap.load(path)
    assert np.array_equal(again.embed(x), emb) and again.lam == ridge.lam and again.feature == "cls+mean"
    captions = [f"c{i}" for i in range(300)]
    text_emb = dict(zip(captions, t))
    lam, cv, oof = cross_fitted_embeddings(x, t, captions, captions, text_emb, k=3, lambdas=(1e-4, 10.0))
    assert lam == 1e-4 and cv[1e-4] > cv[10.0] and oof.shape == t.shape
    with pytest.raises(ValueError, match="not a first-stage"):
        from safetensors.numpy import save_file

        save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
        RidgeMap.load(str(tmp_path / "other.safetensors"))


# -- training and the quality benchmark on generated data -------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A 2-layer random BERT (hidden 384 = the token width) with a vocabulary of the captions' words."""
    from transformers import BertModel, BertTokenizerFast

    from edje_indexer.rerank import minilm_l12_h384_config

    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    cfg = minilm_l12_h384_config(
        vocab_size=5 + len(WORDS), num_hidden_layers=2, num_attention_heads=6, intermediate_size=256
    )
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(str(folder))
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def shapes_corpus(tmp_path_factory):
    """Coloured shapes captioned by colour and shape (30 images; the held-out split is 8 of them)."""
    root = tmp_path_factory.mktemp("shapes")
    pairs = []
    for n, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        for copy in range(2):
            path = root / f"{colour}-{shape}-{copy}.png"
            shape_image(colour, shape, 40 + 8 * copy).rotate(20 * copy).save(path)
            pairs.append(sources.Pair(f"emoji/{colour}-{shape}-{copy}", str(path), f"a {colour} {shape}", "emoji", ""))
        if n % 2 == 0:
            path = root / f"test-{colour}-{shape}.png"
            shape_image(colour, shape, 56).save(path)
            pairs.append(sources.Pair(f"tux/{colour}-{shape}", str(path), f"The {colour} {shape}.", "tuxpaint", ""))
    out = str(root / "corpus")
    data.build_corpus(out, pairs, shard_size=10)
    assert len(data.read_captions(out, "test")) <= 10  # every test query's top 10 is then the whole gallery
    return out


def tiny_args(corpus, run, text_model):
    return ["--data", corpus, "--run", run, "--preset", "tiny", "--random-weights", "--text-model", text_model]


def test_training_learns_and_saves_loadable_models(shapes_corpus, text_model, tmp_path, capsys):
    from safetensors.torch import load_file

    from edje_indexer.pipeline.cli import main as edje_index
    from edje_indexer.pipeline.presets import resolve_spec
    from edje_indexer.rerank import load_reranker
    from edje_indexer.transforms.model import load_model

    run = str(tmp_path / "run")
    argv = ["train", *tiny_args(shapes_corpus, run, text_model), "--steps", "40", "--batch-groups", "4"]
    argv += ["--negatives", "2", "--candidates", "4", "--precision", "fp32", "--lr-text", "3e-4"]
    assert edje_index(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["steps_done"] == 40 and not record["stopped_early"]
    assert record["images"]["train"] + record["images"]["validation"] == len(data.read_captions(shapes_corpus, "train"))
    assert record["loss"]["last_tenth"] < record["loss"]["first_tenth"]  # it learns something
    assert set(os.listdir(run)) >= {"run.json", "adapter.safetensors", "reranker", "first_stage.safetensors", "cache"}
    # the adapter is what `edje-index index --adapter` loads, and it is not the random init any more
    trained = load_model(resolve_spec("tiny", adapter=os.path.join(run, "adapter.safetensors")))
    init = load_model(resolve_spec("tiny", random_adapter=True))
    assert not torch.equal(trained.adapter.query, init.adapter.query)
    assert set(load_file(os.path.join(run, "adapter.safetensors"))) == set(init.adapter.state_dict())
    joint, _ = load_reranker(os.path.join(run, "reranker"))
    assert joint.caption_cleaning == "open_clip" and joint.num_image_tokens == 64
    # the same configuration again: reused, not retrained
    assert edje_index(argv) == 0
    assert "reusing the run" in capsys.readouterr().err


def test_quality_benchmark_code_path(shapes_corpus, text_model, tmp_path, capsys):
    from edje_indexer.benchmarks import quality
    from edje_indexer.schemas.quantization import QUANTIZATIONS

    run, work = str(tmp_path / "run"), str(tmp_path / "work")
    argv = [*tiny_args(shapes_corpus, run, text_model), "--work", work, "--steps", "3", "--batch-groups", "2"]
    argv += ["--negatives", "1", "--candidates", "3", "--precision", "fp32"]
    assert quality.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.load(open(os.path.join(work, "quality.json")))
    test_rows = data.read_captions(shapes_corpus, "test")
    n_test, n_queries = len(test_rows), len({r["caption"] for r in test_rows})
    assert out["data"]["test"]["images"] == n_test and out["data"]["test"]["queries"] == n_queries
    assert out["data"]["test"]["reranked_queries"] == {"t2i": n_queries, "i2t": n_test}
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1"):
        assert 0.0 <= out["first_stage"][key] <= 1.0
    # every query's top-10 is all the test images here: reranking cannot change R@10
    assert out["first_stage"]["t2i_r10"] == 1.0
    for name, per_image in (("fp16", 64 * 384 * 2), ("int8", 64 * 386)):
        r = out["reranked"][name]
        assert r["t2i_r10"] == 1.0 and 0.0 <= r["t2i_r1"] <= 1.0
        assert r["images"] == n_test and r["job_bytes_per_image"] >= per_image  # the job's own figure
        assert per_image <= r["bytes_per_image"] < per_image + 1024  # measured on disk: the arrays' own bytes
    assert set(out["agreement"]["int8"]) == {"top1", "kendall_tau", "i2t_top1", "i2t_kendall_tau"}
    assert out["agreement"]["int8"]["top1"] >= 0.5 and out["agreement"]["int8"]["kendall_tau"] > 0.5
    if "int4" in QUANTIZATIONS:
        assert out["reranked"]["int4"]["bytes_per_image"] < out["reranked"]["int8"]["bytes_per_image"]
        assert 0.0 <= out["agreement"]["int4"]["top1"] <= 1.0
    else:
        assert out["reranked"]["int4"]["available"] is False
    assert {"train_s", "test_backbone_s", "first_stage_s", "index_fp16_s", "rerank_int8_s"} <= set(out["wall_s"])
