"""Model files from local paths and fsspec URLs (edje_indexer.transforms.weights), and a backbone loaded from one."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import fsspec
import numpy as np
import pytest
import safetensors.torch
import torch
from fsspec.implementations.memory import MemoryFileSystem

from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.transforms.encoder import TokenEncoder
from edje_indexer.transforms.model import load_model
from edje_indexer.transforms.weights import local_path, read_state_dict


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(3, 4, generator=g),
        "blocks.0.bias": torch.randn(3, generator=g),
        "norm.weight": torch.ones(5),
        "steps": torch.arange(4),
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.fixture
def memory_dir():
    """A fresh folder of fsspec's in-memory filesystem (process-global), removed afterwards."""
    fs = fsspec.filesystem("memory")
    folder = f"/edje-test-{uuid.uuid4().hex}"
    yield fs, folder
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def test_local_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(small_state(), str(path))
    assert local_path(str(path)) == str(path)  # a local file is used in place
    assert_same_state(read_state_dict(str(path)), small_state())


@pytest.mark.parametrize("wrap", ["model", "state_dict"])
def test_pth_checkpoint_is_unwrapped(tmp_path, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save({wrap: small_state(), "epoch": 7}, path)
    assert_same_state(read_state_dict(str(path)), small_state())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    path = tmp_path / "ddp.pth"
    torch.save({prefix + k: v for k, v in small_state().items()}, path)
    assert_same_state(read_state_dict(str(path)), small_state())


def test_file_url(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(small_state(), str(path))
    url = f"file://{path}"
    assert local_path(url) == str(path)
    assert_same_state(read_state_dict(url), small_state())


def test_memory_url_is_copied_once_per_process(memory_dir, monkeypatch):
    fs, folder = memory_dir
    url = f"memory://{folder}/sub/backbone.safetensors"
    fs.pipe(f"{folder}/sub/backbone.safetensors", safetensors.torch.save(small_state()))
    copies = []
    real_get_file = MemoryFileSystem.get_file

    def get_file(self, rpath, lpath, *args, **kwargs):
        copies.append(rpath)
        return real_get_file(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", get_file)
    first = local_path(url)
    assert len(copies) == 1
    assert os.path.isfile(first) and first.endswith("backbone.safetensors")  # the suffix says which format
    with open(first, "rb") as f:
        assert f.read() == fs.cat(f"{folder}/sub/backbone.safetensors")
    assert local_path(url) == first
    assert_same_state(read_state_dict(url), small_state())
    assert local_path(url) == first  # read_state_dict used the same copy
    assert len(copies) == 1
    # a copy deleted behind its back (a cleaned /tmp) is fetched again
    os.remove(first)
    again = local_path(url)
    assert os.path.isfile(again) and len(copies) == 2
    assert_same_state(read_state_dict(url), small_state())


def test_two_memory_urls_with_the_same_file_name_get_their_own_copies(memory_dir):
    fs, folder = memory_dir
    a, b = small_state(), {"x": torch.zeros(2)}
    fs.pipe(f"{folder}/a/w.safetensors", safetensors.torch.save(a))
    fs.pipe(f"{folder}/b/w.safetensors", safetensors.torch.save(b))
    pa, pb = local_path(f"memory://{folder}/a/w.safetensors"), local_path(f"memory://{folder}/b/w.safetensors")
    assert pa != pb
    assert_same_state(read_state_dict(f"memory://{folder}/a/w.safetensors"), a)
    assert_same_state(read_state_dict(f"memory://{folder}/b/w.safetensors"), b)


@pytest.mark.parametrize("where", ["local", "file", "memory"])
def test_missing_file_is_file_not_found_naming_the_url(tmp_path, memory_dir, where):
    url = {
        "local": str(tmp_path / "nope.safetensors"),
        "file": f"file://{tmp_path}/nope.pth",
        "memory": f"memory://{memory_dir[1]}/nope.safetensors",
    }[where]
    with pytest.raises(FileNotFoundError) as e:
        read_state_dict(url)
    assert url in str(e.value)


def test_a_folder_is_not_a_weights_file(tmp_path, memory_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        local_path(str(tmp_path))
    fs, folder = memory_dir
    fs.pipe(f"{folder}/dir/inner.bin", b"x")
    with pytest.raises(FileNotFoundError, match=f"memory://{folder}/dir"):
        local_path(f"memory://{folder}/dir")


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pth", "garbage.bin"])
def test_garbage_is_a_value_error_naming_the_url(tmp_path, memory_dir, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a model file at all \x00\x01\x02" * 10)
    with pytest.raises(ValueError) as e:
        read_state_dict(str(path))
    assert str(path) in str(e.value)
    fs, folder = memory_dir
    fs.pipe(f"{folder}/{name}", path.read_bytes())
    url = f"memory://{folder}/{name}"
    with pytest.raises(ValueError) as e:
        read_state_dict(url)
    assert url in str(e.value)


class _RunsCode:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": small_state(), "payload": evil}, path)
    with pytest.raises(ValueError, match=str(path)):
        read_state_dict(str(path))
    assert not marker.exists()


# -- a backbone from a memory:// URL ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_random():
    return load_model(PRESETS["tiny"])


def test_load_model_from_a_memory_url(tiny_random, memory_dir):
    fs, folder = memory_dir
    fs.pipe(f"{folder}/backbone.safetensors", safetensors.torch.save(tiny_random.backbone.state_dict()))
    url = f"memory://{folder}/backbone.safetensors"
    loaded = load_model(replace(PRESETS["tiny"], weights=url, random_weights=False, seed=123))
    assert loaded.identity.backbone_sha256 == tiny_random.identity.backbone_sha256
    assert loaded.identity.random_weights is False and tiny_random.identity.random_weights is True
    # the seed changed the adapter (random), but the backbone is exactly the file's
    assert loaded.identity.adapter_sha256 != tiny_random.identity.adapter_sha256
    x = np.random.default_rng(0).integers(0, 256, (2, *PRESETS["tiny"].preprocess.size, 3), dtype=np.uint8)
    inp = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.backbone.forward_features(inp), tiny_random.backbone.forward_features(inp), rtol=0, atol=0
        )


def test_load_model_with_the_same_seed_and_file_gives_the_random_models_tokens(tiny_random, memory_dir):
    fs, folder = memory_dir
    fs.pipe(f"{folder}/b.safetensors", safetensors.torch.save(tiny_random.backbone.state_dict()))
    loaded = load_model(replace(PRESETS["tiny"], weights=f"memory://{folder}/b.safetensors", random_weights=False))
    assert loaded.identity.adapter_sha256 == tiny_random.identity.adapter_sha256
    x = np.random.default_rng(1).integers(0, 256, (3, *PRESETS["tiny"].preprocess.size, 3), dtype=np.uint8)
    a, _, _ = TokenEncoder(loaded, "fp16")(x)
    b, _, _ = TokenEncoder(tiny_random, "fp16")(x)
    np.testing.assert_array_equal(a, b)


def test_weights_that_do_not_fit_the_backbone_are_refused(tiny_random, memory_dir):
    fs, folder = memory_dir
    state = {k: v for k, v in tiny_random.backbone.state_dict().items() if not k.startswith("blocks.1.")}
    fs.pipe(f"{folder}/short.safetensors", safetensors.torch.save(state))
    url = f"memory://{folder}/short.safetensors"
    with pytest.raises(ValueError, match="do not fit") as e:
        load_model(replace(PRESETS["tiny"], weights=url, random_weights=False))
    assert url in str(e.value) and "blocks.1." in str(e.value)
