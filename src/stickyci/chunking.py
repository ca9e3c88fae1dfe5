"""Content-defined chunking (FastCDC): equal bytes are cut at equal places, whatever surrounds them.

Files up to ``MIN_SIZE`` are one chunk and skip the chunker. The parameters are part of the
store format: changing them breaks deduplication against existing stores, which is why a golden
test pins the boundaries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pyfastcdc import FastCDC

AVG_SIZE = 256 << 10
MIN_SIZE = 64 << 10
MAX_SIZE = 1 << 20

_local = threading.local()


def cut(data: bytes | memoryview) -> Iterator[memoryview]:
    """Yield consecutive views of ``data`` whose concatenation is ``data``."""
    view = memoryview(data)
    if len(view) <= MIN_SIZE:
        yield view
        return
    # A FastCDC instance keeps state while cutting, so each thread has its own.
    chunker = getattr(_local, "chunker", None)
    if chunker is None:
        chunker = _local.chunker = FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)
    for chunk in chunker.cut_buf(view):
        yield view[chunk.offset : chunk.offset + chunk.length]
