"""Chunk boundaries are part of the store format: a golden test pins them."""

from __future__ import annotations

import random

from stickyci import chunking
from stickyci.digest import Digest


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_boundaries_are_pinned() -> None:
    # Changing chunker parameters or library silently breaks dedup with existing stores.
    data = _data(4 << 20, 42)
    sizes = [len(c) for c in chunking.cut(data)]
    assert sum(sizes) == len(data)
    assert sizes[:8] == GOLDEN_FIRST_SIZES
    assert len(sizes) == GOLDEN_COUNT
    assert Digest.of(b"".join(str(s).encode() for s in sizes)).hex[:16] == GOLDEN_DIGEST


def test_small_files_are_one_chunk() -> None:
    data = _data(chunking.MIN_SIZE, 1)
    assert [bytes(c) for c in chunking.cut(data)] == [data]


def test_insertion_only_changes_nearby_chunks() -> None:
    data = _data(8 << 20, 7)
    edited = data[: 3 << 20] + b"inserted" + data[3 << 20 :]
    a = {Digest.of(c) for c in chunking.cut(data)}
    b = {Digest.of(c) for c in chunking.cut(edited)}
    assert len(a - b) <= 2
    inner = list(chunking.cut(data))[:-1]
    assert all(chunking.MIN_SIZE <= len(c) <= chunking.MAX_SIZE for c in inner)


GOLDEN_FIRST_SIZES = [85543, 394535, 268196, 300382, 293123, 503651, 380969, 481336]
GOLDEN_COUNT = 11
GOLDEN_DIGEST = "4f585e2a7efe5413"
