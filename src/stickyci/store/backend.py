"""The storage backend interface: a handful of methods over named blobs.

Names are ``<namespace>/<id>`` (``packs/…``, ``index/…``, ``refs/…``); they are validated here,
at the boundary, so no backend ever sees a name that could escape its root. Retries, caching and
packing are wrappers around a backend, never branches inside one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import UsageError

_NAME = re.compile(r"[a-z]+/[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid blob name, else raise."""
    # fullmatch: "$" would also match before a trailing newline.
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"invalid store object name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class Stat:
    """Size and modification time (seconds since the epoch) of a stored blob."""

    size: int
    mtime: float


class Backend(Protocol):
    """What every store backend provides. ``etag`` values are opaque strings."""

    url: str

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``name`` atomically and durably; replace any previous blob."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes (all, if None) from ``offset``; raise ``NotFound`` if absent."""

    def stat(self, name: str) -> Stat | None:
        """Size and mtime of ``name``, or None if it does not exist."""

    def missing(self, names: Sequence[str]) -> list[str]:
        """The subset of ``names`` that does not exist (one round trip where the backend can)."""

    def list(self, namespace: str) -> list[str]:
        """Names under ``namespace`` (e.g. ``"refs"``), in no particular order."""

    def delete(self, name: str) -> None:
        """Remove ``name``; absent names are not an error."""

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """The content of ``name`` and its etag, or None if it does not exist."""

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Replace ``name`` only if its current etag is ``etag`` (None: only if absent).

        Returns False, and changes nothing, if another writer got there first.
        """
