"""The object envelope: a versioned header, then zstd (or raw, when zstd does not help).

Layout: ``b"SCI"``, one version byte, one codec byte, then the payload. The digest of an
object is taken over its plaintext, so decoding verifies it against the name it was read by.
"""

from __future__ import annotations

import threading

import zstandard

from .digest import Digest
from .errors import IntegrityError

MAGIC = b"SCI"
VERSION = 1
RAW = 0
ZSTD = 1
HEADER_SIZE = len(MAGIC) + 2
LEVEL = 3

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread keeps workers from contending.
    comps: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        comp = comps[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "dec", None)
    if dec is None:
        dec = zstandard.ZstdDecompressor()
        _local.dec = dec
    return dec


def encode(plain: bytes | memoryview, level: int = LEVEL) -> bytes:
    """Wrap ``plain`` in an envelope, compressed (at zstd ``level``) unless compression would
    not save space."""
    packed = _compressor(level).compress(plain)
    if len(packed) < len(plain):
        return MAGIC + bytes((VERSION, ZSTD)) + packed
    return MAGIC + bytes((VERSION, RAW)) + bytes(plain)


def decode(envelope: bytes | memoryview, expected: Digest) -> bytes:
    """Unwrap an envelope and check that its plaintext hashes to ``expected``."""
    head = bytes(envelope[:HEADER_SIZE])
    if len(head) < HEADER_SIZE or head[:3] != MAGIC:
        raise IntegrityError(f"object {expected} is corrupt: bad envelope header")
    if head[3] != VERSION:
        raise IntegrityError(
            f"object {expected} has envelope version {head[3]}; upgrade stickyci to read it"
        )
    body = envelope[HEADER_SIZE:]
    if head[4] == ZSTD:
        try:
            plain = _decompressor().decompress(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"object {expected} is corrupt: {exc}") from exc
    elif head[4] == RAW:
        plain = bytes(body)
    else:
        raise IntegrityError(f"object {expected} is corrupt: unknown codec {head[4]}")
    if Digest.of(plain) != expected:
        raise IntegrityError(f"object {expected} is corrupt: content does not match its digest")
    return plain
