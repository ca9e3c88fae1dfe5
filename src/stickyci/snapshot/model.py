"""The manifest: a deterministic, immutable description of a directory tree.

Entries are sorted by path (so a parent precedes its children) and serialised as compact JSON
arrays; the BLAKE3 of the serialised manifest is the snapshot id. Paths are relative POSIX
paths. A manifest can come from an untrusted store, so ``validate`` runs before anything is
written from one (see ``restore``); reading one to compare or extend it does not need it.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import IntegrityError, UnsafePath

FORMAT = 1
DIR, FILE, SYMLINK = "dir", "file", "symlink"


# A chunk reference: [hex digest, length]. A list, not a tuple, because that is what JSON
# gives back, and converting 50 000 of them on every commit was a measurable cost.
ChunkRef = list[Any]


@dataclass(slots=True)
class Entry:
    """One path in a tree. ``chunks`` holds ``[hex digest, length]`` pairs for files."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    chunks: list[ChunkRef] = field(default_factory=list)
    target: str = ""
    link: int = 0  # hardlink group; entries sharing a non-zero group are one inode

    def to_row(self) -> list[Any]:
        """Compact JSON form: the fields in declaration order."""
        return [self.path, self.kind, self.mode, self.mtime_ns, self.uid, self.gid, self.size,
                self.chunks, self.target, self.link]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        """Parse the compact JSON form."""
        if len(row) != 10:
            raise ValueError(f"entry {row[:1]} has {len(row)} fields, not 10")
        return cls(*row)

    def same_content(self, other: Entry) -> bool:
        """True if both entries describe the same bytes (or link target)."""
        return (self.kind, self.size, self.chunks, self.target) == (
            other.kind, other.size, other.chunks, other.target)

    def same_meta(self, other: Entry) -> bool:
        """True if mode, mtime and ownership are equal."""
        return (self.mode, self.mtime_ns, self.uid, self.gid) == (
            other.mode, other.mtime_ns, other.uid, other.gid)


@dataclass(slots=True)
class Manifest:
    """A whole tree: entries by path."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def sorted_entries(self) -> list[Entry]:
        """Entries in path order (parents first)."""
        return [self.entries[p] for p in sorted(self.entries)]

    @property
    def size(self) -> int:
        """Total bytes of file content (hardlinked content counted once)."""
        seen: set[int] = set()
        total = 0
        for e in self.entries.values():
            if e.kind != FILE or (e.link and e.link in seen):
                continue
            if e.link:
                seen.add(e.link)
            total += e.size
        return total

    def chunk_digests(self) -> set[str]:
        """Every chunk this tree references."""
        return {h for e in self.entries.values() for h, _ in e.chunks}

    def encode(self) -> bytes:
        """Deterministic serialisation; hardlink groups are renumbered in path order."""
        renumber: dict[int, int] = {}
        rows = []
        for e in self.sorted_entries():
            row = e.to_row()
            if e.link:
                row[9] = renumber.setdefault(e.link, len(renumber) + 1)
            rows.append(row)
        doc: dict[str, Any] = {"format": FORMAT, "entries": rows}
        try:
            return orjson.dumps(doc)
        except TypeError:
            # A name or link target that is not UTF-8 (os gives it back surrogate-escaped)
            # cannot be a JSON string; such values are stored as their raw bytes in base64.
            for row in rows:
                row[0], row[8] = _escape(row[0]), _escape(row[8])
            doc["escaped"] = True
            return orjson.dumps(doc)

    @classmethod
    def decode(cls, data: bytes, name: str = "manifest") -> Manifest:
        """Parse a manifest; raise ``IntegrityError`` on a malformed one."""
        try:
            doc = orjson.loads(data)
            if doc.get("format") != FORMAT:
                raise IntegrityError(f"{name} has format {doc.get('format')}; upgrade stickyci")
            rows = doc["entries"]
            if doc.get("escaped"):
                for row in rows:
                    row[0], row[8] = _unescape(row[0]), _unescape(row[8])
            entries = [Entry.from_row(r) for r in rows]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"{name} is not a valid manifest: {exc}") from exc
        return cls({e.path: e for e in entries})


def _escape(text: str) -> str | dict[str, str]:
    try:
        text.encode()
    except UnicodeEncodeError:
        return {"raw": base64.b64encode(os.fsencode(text)).decode()}
    return text


def _unescape(value: str | dict[str, str]) -> str:
    return os.fsdecode(base64.b64decode(value["raw"])) if isinstance(value, dict) else value


def check_path(path: str) -> None:
    """Reject paths that could land outside the restore root."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\0" in path
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafePath(f"manifest path {path!r} is unsafe (absolute, empty or with '..'); "
                         "refusing to restore it")


def validate(m: Manifest, name: str = "manifest") -> None:
    """Check every path is relative and clean, and that every parent is a directory entry.

    The second rule is what stops a restore from writing through a symlink: a child can only
    be created under a directory that the restore itself made.
    """
    for path, e in m.entries.items():
        check_path(path)
        if e.kind not in (DIR, FILE, SYMLINK):
            raise IntegrityError(f"{name}: entry {path!r} has unknown type {e.kind!r}")
        parent = path.rpartition("/")[0]
        if parent and (parent not in m.entries or m.entries[parent].kind != DIR):
            raise UnsafePath(
                f"manifest path {path!r} would be written through {parent!r}, which is not a "
                "directory in the snapshot; refusing to restore it")
