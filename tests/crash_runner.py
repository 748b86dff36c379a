"""Runs ``edje-index`` in this process and SIGKILLs it at a chosen point.

Usage: python tests/crash_runner.py POINT N -- edje-index arguments...
POINT is where to die, the N-th time it is reached:
  read    while reading a shard (after its first samples were decoded)
  write   while writing a segment (its arrays written, dead letters and commit not yet)
  commit  between data and commit (the commit record's temp file written, not renamed)
  index   after every shard committed, before the id index is published
"""

import os
import signal
import sys

from edje_indexer.pipeline.cli import main
from edje_indexer.schemas import segment as schemas_segment
from edje_indexer.schemas import storage as schemas_storage
from edje_indexer.transforms import indexer as transforms_indexer

point, nth = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1 :]
hits = {"n": 0}


def maybe_die():
    hits["n"] += 1
    if hits["n"] == nth:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if point == "read":
    original_iter = transforms_indexer.iter_shard

    def iter_shard(*a, **kw):
        for i, item in enumerate(original_iter(*a, **kw)):
            if i == 2:
                maybe_die()
            yield item

    transforms_indexer.iter_shard = iter_shard
elif point == "write":
    original_ids = schemas_segment.ids_checksum

    def ids_checksum(ids):
        maybe_die()
        return original_ids(ids)

    schemas_segment.ids_checksum = ids_checksum
elif point == "commit":
    original_replace = schemas_storage.os.replace

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if "/commits/" in dst:
                maybe_die()
            return original_replace(src, dst)

    schemas_storage.os = _Os()
elif point == "index":  # after the job's log entry, before the index pointer is published
    from edje_indexer.schemas import index as schemas_index

    original_publish = schemas_index.publish

    def publish(*a, **kw):
        maybe_die()
        return original_publish(*a, **kw)

    schemas_index.publish = publish
else:
    raise SystemExit(f"unknown crash point {point}")

sys.exit(main(argv))
