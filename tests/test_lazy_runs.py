"""A reader's lazy fill reads a file's chunks by ranges: one read per run of chunks stored back
to back in one pack. Which chunks share a read is a pure function of their locations."""

from __future__ import annotations

import pytest

from stickyci.digest import Digest
from stickyci.disks.filler import _runs
from stickyci.store import Location


def _chunk(i: int, where: tuple[str, int, int] | None) -> tuple[Digest, int, Location | None]:
    return Digest.of(bytes([i])), 10, Location(*where) if where else None


@pytest.mark.parametrize(("places", "groups"), [
    ([("p", 0, 5), ("p", 5, 7), ("p", 12, 3)], [[0, 1, 2]]),  # back to back: one read
    ([("p", 0, 5), ("p", 6, 7)], [[0], [1]]),  # a gap: two reads, not the bytes between
    ([("p", 0, 5), ("q", 5, 7)], [[0], [1]]),  # another pack
    ([("p", 5, 5), ("p", 0, 5)], [[0], [1]]),  # stored in the other order
    ([("p", 0, 5), None, ("p", 5, 5)], [[0], [1], [2]]),  # not located: alone, splits the run
    ([None, None], [[0], [1]]),
    ([], []),
])
def test_chunks_share_a_read_only_when_stored_back_to_back(
        places: list[tuple[str, int, int] | None], groups: list[list[int]]) -> None:
    chunks = [_chunk(i, where) for i, where in enumerate(places)]
    got = [[chunks.index(c) for c in run] for run in _runs(chunks)]
    assert got == groups
