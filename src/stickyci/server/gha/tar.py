"""Where to cut a tar stream so that its members' contents deduplicate.

GNU tar's POSIX format (``@actions/cache`` runs ``tar --posix``) writes each member's atime
and ctime into its header, and a restore sets every ctime to now: the next archive of the same
tree has a different header before every file. Cut by content alone, the chunk holding a
header and the start of its file changes with it; a run of small files, whose chunks all hold
some header, shares nothing at all. So the stream is cut around each member's header block(s),
and content-defined chunking runs within a member's data only.

The walk only places cuts: every byte of the stream comes out, in order, whatever it holds.
Anything it does not follow (a bad checksum, an odd size, the end-of-archive blocks and what
comes after) goes out as it is, chunked by content with no further cuts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

BLOCK = 512
COPY_SIZE = 8 << 20
MAX_META = 1 << 20
"""A pax or long-name header with more data than this is not followed (no real one is)."""
_META = frozenset(b"xgLK")  # pax extended, pax global, GNU long name, GNU long link
_NO_DATA = frozenset(b"123456")  # links, devices, directories, fifos: no data follows
_PAX_SIZE = re.compile(rb"(?:^|\n)\d+ size=(\d{1,20})\n")

CUT = None
"""Yielded between a member's header and its data, and after its data."""


class Readable(Protocol):
    """A binary stream."""

    def read(self, size: int = -1, /) -> bytes: ...


def tar_pieces(f: Readable) -> Iterator[bytes | None]:
    """The bytes of the tar stream ``f``, in order, with ``CUT`` where a chunk must end."""
    override: int | None = None
    while True:
        header = _exact(f, BLOCK)
        size = _member_size(header)
        if size is None:
            yield header
            yield from _rest(f)
            return
        kind = header[156]
        yield header
        padded = -(-size // BLOCK) * BLOCK
        if kind in _META:
            if padded > MAX_META:
                yield from _rest(f)
                return
            data = _exact(f, padded)
            yield data
            if kind == ord("x"):
                found = _PAX_SIZE.search(data[:size])
                override = int(found.group(1)) if found else None
            continue  # the member's own header follows: still its header
        if override is not None:
            padded, override = -(-override // BLOCK) * BLOCK, None
        if kind in _NO_DATA:
            padded = 0
        yield CUT
        while padded:
            data = f.read(min(padded, COPY_SIZE))
            if not data:
                return
            padded -= len(data)
            yield data
        yield CUT


def _member_size(header: bytes) -> int | None:
    """The data size a header declares, or None unless it is a header with a valid checksum."""
    if len(header) < BLOCK or header == bytes(BLOCK):
        return None
    field = header[148:156].strip(b"\0 ")
    try:
        declared = int(field, 8)
    except ValueError:
        return None
    if declared != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        return None
    raw = header[124:136]
    if raw[0] & 0x80:  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(raw[1:], "big")
    try:
        return int(raw.strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None


def _exact(f: Readable, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = f.read(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def _rest(f: Readable) -> Iterator[bytes]:
    while data := f.read(COPY_SIZE):
        yield data
