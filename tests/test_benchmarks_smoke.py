"""Smoke tests of the benchmark harnesses: they run and report sane JSON (no speed assertions)."""

from __future__ import annotations

import json
import numbers

from edje_indexer.benchmarks import incremental, throughput


def _positive(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0


def test_throughput_smoke(tmp_path, capsys):
    argv = [
        "-n",
        "16",
        "--shards",
        "2",
        "--batch-size",
        "8",
        "--decode-threads",
        "2",
        "--preset",
        "tiny",
        "--dir",
        str(tmp_path),
    ]
    assert throughput.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("limit_images_per_s", "job_images_per_s", "ratio", "run_job_wall_s", "job_seconds", "cpu_count"):
        assert _positive(out[key]), (key, out[key])
    for key in ("job_phase", "limit_phase", "this_process"):
        assert _positive(out["peak_rss_mb"][key]), key
    # The job-only peak needs Linux's clear_refs (resetting the high-water mark); None where not allowed.
    assert out["peak_rss_mb"]["job_only"] is None or _positive(out["peak_rss_mb"]["job_only"])
    assert _positive(out["ru_maxrss_mb"]["job_phase"])
    assert out["images"] == out["limit"]["images"] == out["job"]["images"] == 16
    assert out["shards"] == out["job"]["shards"] == 2
    assert out["device"] == "cpu" and out["torch_device_name"]
    assert out["model"]["preset"] == "tiny" and out["batch_size"] == 8 and out["decode_threads"] == 2
    assert _positive(out["torch_threads"]["limit"]) and _positive(out["torch_threads"]["job"])
    assert out["torch"] and out["timm"]
    assert out["job"]["encoder_reused"] is True  # the job used the encoder that was warmed up
    assert set(out["job"]["time_s"]) >= {"encode", "waiting_for_decode_and_read", "write", "outside_shards"}

    # The corpus is cached in --dir: a second run reuses it (in-process this time).
    assert throughput.main(argv + ["--in-process", "--decode-threads", "1,2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["corpus"]["cached"] is True
    assert [s["decode_threads"] for s in again["decode_threads_sweep"]] == [1, 2]
    assert _positive(again["ratio"])


def test_corpus_sizes_and_cache(tmp_path):
    import io
    import tarfile

    from PIL import Image

    info = throughput.build_corpus(str(tmp_path), 12, 3)
    assert info["counts"] == [4, 4, 4] and info["cached"] is False
    sizes = []
    for s in range(3):
        with tarfile.open(tmp_path / f"corpus-n12-s3/bench-{s:06d}.tar") as tf:
            for m in tf.getmembers():
                with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                    assert im.format == "JPEG"
                    sizes.append(im.size)
    assert sizes[:5] == throughput.SIZES  # every size early on, even in a small corpus
    assert throughput.build_corpus(str(tmp_path), 12, 3)["cached"] is True


def test_shard_counts_and_batch_shapes():
    assert throughput.shard_counts(10, 3) == [4, 3, 3]
    assert throughput.shard_counts(2, 5) == [1, 1]
    assert throughput._batch_shapes([40, 40, 39], 32) == [32, 8, 7]


def test_incremental_smoke(tmp_path, capsys):
    rc = incremental.main(["--shards", "3", "--repeats", "1", "--dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["existing_segment_files_untouched"] is True
    assert out["existing_segment_files_checked"] > 0
    for key in ("initial_full_run_s", "incremental_run_s", "one_shard_empty_store_s", "ratio"):
        assert _positive(out[key]), key


def test_rss_scaling_smoke(tmp_path, capsys):
    rc = throughput.main(
        [
            "--rss-scaling",
            "--rss-factor",
            "2",
            "-n",
            "4",
            "--shards",
            "2",
            "--batch-size",
            "2",
            "--decode-threads",
            "1",
            "--dir",
            str(tmp_path),
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "rss_scaling"
    assert (out["small"]["images"], out["small"]["shards"]) == (4, 2)
    assert (out["large"]["images"], out["large"]["shards"]) == (8, 4)
    assert out["small"]["images_per_shard"] == out["large"]["images_per_shard"] == 2
    assert _positive(out["small"]["peak_rss_mb"]) and _positive(out["large"]["peak_rss_mb"])
    assert _positive(out["peak_rss_ratio"])
    assert rc == (0 if out["within_goal"] else 1)


def test_scale_smoke(tmp_path, capsys):
    from edje_indexer.benchmarks import scale

    assert (
        scale.main(
            [
                "--segments",
                "40",
                "--data-segments",
                "3",
                "--ids-per-segment",
                "10",
                "--repeats",
                "1",
                "--dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"]
    assert run["segments"] == 40 and run["ids"] == 400 and run["store_images_after_jobs"] == 404
    for key in ("job_s", "job_ratio", "open_s", "rss_after_open_mb", "rss_after_gets_mb", "k1000_get_images_per_s"):
        assert _positive(run[key]), (key, run[key])
    # the launcher read no commit record of the 40 old segments: the log's checkpoint says what they are
    assert run["launcher_reads"].get("read_many", 0) <= 8, run["launcher_reads"]


def test_read_smoke(tmp_path, capsys):
    from edje_indexer.benchmarks import read

    for quant in ("fp16", "int4-rht"):
        argv = ["--images", "240", "--images-per-segment", "60", "--quantization", quant, "--batches-scale", "0.01"]
        assert read.main(argv + ["--dir", str(tmp_path / quant)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["images"] == 240 and out["segments"] == 4 and out["quantization"] == quant
        assert set(out["results"]) == {"10", "100"}  # k = 1000 needs 1,000 images
        for k, r in out["results"].items():
            for name in ("get", "get_out", "get_fp16", "get_raw"):
                assert _positive(r[name]["p50_images_per_s"]) and _positive(r[name]["ratio_to_limit_p50"]), (k, name)
                assert r[name]["ratio_to_limit"] >= 0, (k, name)  # from means: a few batches, maybe one slow
        assert out["store_bytes"] > 240 * (12_416 if quant == "int4-rht" else 49_152)
