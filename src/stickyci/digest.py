"""Content digests: BLAKE3, 32 bytes, written ``blake3:<hex>`` for people and bare hex in names."""

from __future__ import annotations

import re
from dataclasses import dataclass

import blake3

_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A BLAKE3 digest of some bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValueError("a BLAKE3 digest has 32 bytes")

    @property
    def hex(self) -> str:
        """The digest as 64 lowercase hex characters."""
        return self.raw.hex()

    def __str__(self) -> str:
        return f"blake3:{self.raw.hex()}"

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """Hash ``data`` on the calling thread.

        blake3's own thread pool is never used: commits fork worker processes, and a child
        forked after the pool started deadlocks on its first threaded hash. Parallelism comes
        from the workers instead.
        """
        return cls(blake3.blake3(data).digest())

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``blake3:<hex>`` or bare hex; raise ``ValueError`` on anything else."""
        hexpart = text.removeprefix("blake3:")
        if not _HEX.fullmatch(hexpart):  # "$" would allow a trailing newline
            raise ValueError(f"not a BLAKE3 digest: {text!r}")
        return cls(bytes.fromhex(hexpart))
