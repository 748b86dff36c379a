"""EDJE token indexer: WebDataset image shards -> EDJE token stores (Zarr v3).

The repository keeps one folder per concern (``pipeline/``, ``transforms/``,
``schemas/``, ``rerank/``, ``benchmarks/``); ``setup.py`` installs each of
them under this package, so nothing of the project lands on ``sys.path`` as a
top-level module (see ARCHITECTURE.md):

* ``edje_indexer.schemas``: what a store is (layout, records, encoding, writer, reader).
* ``edje_indexer.transforms``: the stages of one shard and the Beam transform over shards.
* ``edje_indexer.pipeline``: the job, planning, store upkeep and the ``edje-index`` command.
* ``edje_indexer.rerank``: the reference online reranker (extra ``[rerank]``).
* ``edje_indexer.benchmarks``: the benchmarks behind the README's figures.
"""

# The one definition of the version: setup.py reads it from here, stores record it.
__version__ = "0.2.0"
