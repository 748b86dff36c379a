"""The real job on the local runner, checked against the model run directly."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.schemas import TokenStore
from edje_indexer.transforms import TokenEncoder, decode_image, load_model

TINY = ["--preset", "tiny", "--batch-size", "3"]


@pytest.fixture(scope="module")
def reference_encoder():
    return TokenEncoder(load_model(PRESETS["tiny"]), "fp16")


def reference_tokens(encoder: TokenEncoder, data: bytes) -> np.ndarray:
    pixels = decode_image(data, encoder.model.preprocess)
    return encoder.encode_float(pixels[None].copy()).numpy()[0]


def run_index(pattern, store, *extra) -> int:
    return main(["index", "--input", pattern, "--store", store, *TINY, *extra])


def stored_by_plain_zarr(store: str) -> dict[str, np.ndarray]:
    """id -> stored values, reading only with zarr and the commit records."""
    out = {}
    for name in sorted(os.listdir(os.path.join(store, "commits"))):
        rec = json.load(open(os.path.join(store, "commits", name)))
        group = zarr.open_group(os.path.join(store, rec["data_path"]), mode="r")
        ids = group["ids"][:]
        tokens = group["tokens"][:]
        assert tokens.shape == (rec["rows"], 64, 384) and len(ids) == rec["rows"]
        for i, t in zip(ids, tokens):
            out[str(i)] = t
    return out


def test_end_to_end_tokens_match_the_model(tmp_path, corpus, reference_encoder):
    pattern, images, bad = corpus
    store = str(tmp_path / "store")
    assert run_index(pattern, store) == 0

    root = zarr.open_group(store, mode="r")
    meta = root.attrs["edje"]
    assert meta["quantization"] == "fp16" and meta["model"]["tokens_per_image"] == 64
    assert meta["model"]["backbone_sha256"] == reference_encoder.model.identity.backbone_sha256

    stored = stored_by_plain_zarr(store)
    assert set(stored) == set(images)
    for image_id, data in images.items():
        ref = reference_tokens(reference_encoder, data)
        got = stored[image_id]
        assert got.dtype == np.float16
        # fp16 rounding (half an ulp, 2**-11 relative) plus batch-vs-single float noise
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=1e-4)

    # every sample is accounted for: stored, or in a dead-letter table
    rejected = pq.read_table(os.path.join(store, "rejected")).to_pylist()
    assert [r["id"] for r in rejected] == bad
    assert rejected[0]["stage"] == "decode" and rejected[0]["shard"].endswith("shard-000001.tar")
    assert rejected[0]["member"] == "s1-bad.jpg" and rejected[0]["message"]

    # the project's reader agrees with plain zarr, and decodes to float32
    ts = TokenStore.open(store)
    ids = sorted(images)
    assert len(ts) == len(images) and sorted(ts.ids()) == ids
    np.testing.assert_array_equal(ts.get(ids), np.stack([stored[i] for i in ids]).astype(np.float32))


def test_multiprocess_runner_gives_identical_store(tmp_path, corpus):
    pattern, images, _ = corpus
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_index(pattern, a) == 0
    assert run_index(pattern, b, "--direct_num_workers=2", "--direct_running_mode=multi_processing") == 0
    sa, sb = stored_by_plain_zarr(a), stored_by_plain_zarr(b)
    assert sa.keys() == sb.keys() == images.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])  # re-indexing reproduces tokens bit for bit


def test_int8_store_and_inspect(tmp_path, corpus, capsys):
    pattern, images, _ = corpus
    f16, i8 = str(tmp_path / "f16"), str(tmp_path / "i8")
    assert run_index(pattern, f16) == 0
    assert run_index(pattern, i8, "--quantize", "int8") == 0
    capsys.readouterr()
    assert main(["inspect", i8, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("images", "segments", "tokens_per_image", "token_dim", "quantization", "bytes_per_image", "rejected"):
        assert key in info
    assert (info["images"], info["segments"], info["tokens_per_image"], info["token_dim"]) == (12, 3, 64, 384)
    assert info["quantization"] == "int8" and info["stored_dtype"] == "int8"
    assert 24_704 <= info["bytes_per_image"] <= 25_500
    assert info["rejected"] == {"decode_error": 1}

    ids = sorted(images)
    full, small = TokenStore.open(f16).get(ids), TokenStore.open(i8).get(ids)
    values, scales = TokenStore.open(i8).get_raw(ids)
    assert values.dtype == np.int8 and scales.shape == (12, 64)
    bound = scales.astype(np.float32)[..., None] * 0.51 + np.abs(full) * 2e-3 + 1e-6
    assert (np.abs(full - small) <= bound).all()


def test_inspect_and_get_fp16(tmp_path, corpus, capsys):
    pattern, images, _ = corpus
    store = str(tmp_path / "store")
    assert run_index(pattern, store) == 0
    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_per_image"] <= 50_000 and info["samples_read"] == 13
    out = str(tmp_path / "t.npy")
    first = sorted(images)[0]
    assert main(["get", store, first, "--out", out]) == 0
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == (64, 384)
    assert main(["get", store, "no-such-id"]) == 2
    assert "unknown image id 'no-such-id'" in capsys.readouterr().err


def test_rerun_skips_committed_shards(tmp_path, corpus, capsys):
    pattern, _, _ = corpus
    store = str(tmp_path / "store")
    assert run_index(pattern, store) == 0
    before = {
        n: os.path.getmtime(os.path.join(store, "commits", n)) for n in os.listdir(os.path.join(store, "commits"))
    }
    capsys.readouterr()
    assert run_index(pattern, store, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_skipped"] == 3 and summary["shards_processed"] == 0 and summary["images_indexed"] == 0
    after = {n: os.path.getmtime(os.path.join(store, "commits", n)) for n in os.listdir(os.path.join(store, "commits"))}
    assert before == after


def _listing(root):
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
        for d, _, fs in os.walk(root)
        for f in fs
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--quantize", "int8"], "quantization: store has 'fp16', job has 'int8'"),
        (["--id-policy", "shard-key"], "id_policy"),
        (["--no-jpeg-draft"], "jpeg_draft"),
    ],
)
def test_model_or_settings_mismatch_is_refused_before_writing(tmp_path, corpus, capsys, extra, needle):
    pattern, _, _ = corpus
    store = str(tmp_path / "store")
    first = pattern.replace("{000000..000002}", "000000")
    assert run_index(first, store) == 0
    before = _listing(store)
    capsys.readouterr()
    assert run_index(pattern, store, *extra) == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and needle in err
    assert _listing(store) == before


def test_other_backbone_is_refused(tmp_path, corpus, capsys):
    pattern, _, _ = corpus
    store = str(tmp_path / "store")
    assert run_index(pattern, store) == 0
    before = _listing(store)
    rc = main(
        [
            "index",
            "--input",
            pattern,
            "--store",
            store,
            "--backbone",
            "vit_tiny_patch16_224",
            "--random-weights",
            "--random-adapter",
            "--batch-size",
            "3",
        ]
    )
    assert rc == 2 and "model.backbone_kwargs" in capsys.readouterr().err
    assert _listing(store) == before


def test_zero_matches_is_an_error(tmp_path, capsys):
    rc = main(["index", "--input", str(tmp_path / "nothing-*.tar"), "--store", str(tmp_path / "s"), *TINY])
    assert rc == 2 and "matched no shards" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")


def test_cuda_requested_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal only applies without one")
    with pytest.raises(RuntimeError, match="requested but torch sees no CUDA GPU"):
        TokenEncoder(load_model(PRESETS["tiny"]), "fp16", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path_runs_on_the_gpu(reference_encoder, corpus):
    _, images, _ = corpus
    enc = TokenEncoder(load_model(PRESETS["tiny"]), "fp16", device="cuda")
    batch = np.stack([decode_image(d, enc.model.preprocess) for d in images.values()])
    assert enc.encode_float(batch).is_cuda
    values, _, finite = enc(batch)
    ref = reference_encoder.encode_float(batch).numpy()
    assert finite.all()
    np.testing.assert_allclose(values.astype(np.float32), ref, rtol=0.05, atol=0.02)  # bf16 autocast


def test_torchvision_decoder_path(tmp_path, corpus):
    """The decoder that uses nvJPEG on GPUs, run with the CPU as its device."""
    from torch.nn.functional import cosine_similarity

    from edje_indexer.pipeline.presets import resolve_spec
    from edje_indexer.transforms.decoders import TorchvisionDecoder

    pattern, images, bad = corpus
    store = str(tmp_path / "store")
    assert run_index(pattern, store, "--decoder", "torchvision") == 0
    ts = TokenStore.open(store)
    assert ts.metadata.model.preprocessing["decoder"] == "torchvision"
    assert sorted(ts.ids()) == sorted(images)
    enc = TokenEncoder(load_model(resolve_spec("tiny", decoder="torchvision")), "fp16")
    pillow = TokenEncoder(load_model(resolve_spec("tiny")), "fp16")
    for image_id, data in images.items():
        pixels = TorchvisionDecoder(enc.model.preprocess, enc.device, 10**8).prepare(data)
        ref = enc.encode_float(pixels[None].copy()).numpy()[0]
        np.testing.assert_allclose(ts.get([image_id])[0], ref, rtol=2e-3, atol=1e-4)
        # torch's antialiased resize of a full decode vs Pillow's draft + resize: close, not equal
        other = reference_tokens(pillow, data)
        assert cosine_similarity(torch.from_numpy(ref).flatten(), torch.from_numpy(other).flatten(), dim=0) > 0.95
    assert pq.read_table(os.path.join(store, "rejected")).column("id").to_pylist() == bad


def test_a_mistyped_flag_is_an_error_not_a_beam_option(tmp_path, corpus, capsys):
    pattern, _, _ = corpus
    rc = main(["index", "--input", pattern, "--store", str(tmp_path / "s"), *TINY, "--quantise", "int8"])
    assert rc == 2 and "unknown option(s) --quantise" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_int4_store_end_to_end(tmp_path, corpus, reference_encoder, capsys, rotation):
    """--quantize int4 [--int4-rotation hadamard] through the real job: packed uint8 + float16 scales on disk,
    at most 13,000 bytes of token data per image, decoded within the bound of the model's own tokens, and
    every store command handles it."""
    pattern, images, bad = corpus
    store = str(tmp_path / "i4")
    assert run_index(pattern, store, "--quantize", "int4", "--int4-rotation", rotation) == 0
    quant = {"none": "int4", "hadamard": "int4-rht"}[rotation]
    meta = zarr.open_group(store, mode="r").attrs["edje"]
    assert meta["quantization"] == quant and meta["token_encoding"]["tokens_dtype"] == "uint8"
    rotation_attrs = meta["token_encoding"]["rotation"]
    assert (rotation_attrs is None) == (rotation == "none")
    if rotation_attrs:
        assert (rotation_attrs["block"], rotation_attrs["blocks"], rotation_attrs["seed"]) == (128, 3, 0)

    data_bytes = rows = 0
    for name in sorted(os.listdir(os.path.join(store, "commits"))):
        rec = json.load(open(os.path.join(store, "commits", name)))
        group = zarr.open_group(os.path.join(store, rec["data_path"]), mode="r")
        assert group["tokens"].shape == (rec["rows"], 64, 192) and group["tokens"].dtype == np.uint8
        assert group["scales"].shape == (rec["rows"], 64) and group["scales"].dtype == np.float16
        assert dict(group["tokens"].attrs["encoding"]) == meta["token_encoding"]
        for array in ("tokens", "scales"):  # the chunk files: the token data on disk
            for folder, _, files in os.walk(os.path.join(store, rec["data_path"], array, "c")):
                data_bytes += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        rows += rec["rows"]
    assert rows == len(images) == 12
    assert 12_416 <= data_bytes / rows <= 13_000, data_bytes / rows

    ts = TokenStore.open(store)
    ids = sorted(images)
    got = ts.get(ids).astype(np.float64)
    values, scales = ts.get_raw(ids)
    assert values.dtype == np.uint8 and values.shape == (12, 64, 192) and scales.shape == (12, 64)
    s = scales.astype(np.float64)
    refs = np.stack([reference_tokens(reference_encoder, images[i]) for i in ids]).astype(np.float64)
    noise = 2e-3 * np.abs(refs) + 1e-4  # batch-vs-single float noise, as for fp16 above
    if rotation == "none":
        assert (np.abs(got - refs) <= s[..., None] / 2 + noise).all()
    else:  # the bound holds on the rotated values; the rotation is orthogonal
        assert (np.linalg.norm(got - refs, axis=-1) <= np.sqrt(384) * s / 2 + np.linalg.norm(noise, axis=-1)).all()
    assert 0 < np.linalg.norm(got - refs) / np.linalg.norm(refs) < 0.2

    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"] == quant and info["stored_dtype"] == "uint8" and info["images"] == 12
    assert main(["verify", store, "--deep"]) == 0
    out = str(tmp_path / "t.npy")
    assert main(["get", store, ids[3], "--out", out]) == 0
    np.testing.assert_array_equal(np.load(out), ts.get([ids[3]])[0])
    assert main(["inspect", store, "--html", str(tmp_path / "report.html"), "--sample-rows", "12"]) == 0
    assert "quantization relative error" in (tmp_path / "report.html").read_text()


def test_int4_rotation_without_int4_is_refused(tmp_path, corpus, capsys):
    pattern, _, _ = corpus
    store = str(tmp_path / "s")
    assert run_index(pattern, store, "--quantize", "int8", "--int4-rotation", "hadamard") == 2
    assert "--int4-rotation hadamard applies to --quantize int4 only" in capsys.readouterr().err
    assert not os.path.exists(store)
