"""The manifest: a deterministic, immutable description of a directory tree.

Entries are sorted by path (so a parent precedes its children) and serialised as compact JSON
arrays; the BLAKE3 of the serialised manifest is the snapshot id. Paths are relative POSIX
paths, validated whenever a manifest is read: a manifest can come from an untrusted store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, UnsafePath

FORMAT = 1
DIR, FILE, SYMLINK = "dir", "file", "symlink"


@dataclass(slots=True)
class Entry:
    """One path in a tree. ``chunks`` holds ``(hex digest, length)`` pairs for files."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    chunks: list[tuple[str, int]] = field(default_factory=list)
    target: str = ""
    link: int = 0  # hardlink group; entries sharing a non-zero group are one inode

    def to_row(self) -> list[Any]:
        """Compact JSON form."""
        extra: Any = self.target if self.kind == SYMLINK else [list(c) for c in self.chunks]
        return [self.path, self.kind, self.mode, self.mtime_ns, self.uid, self.gid, self.size,
                extra, self.link]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        """Parse the compact JSON form."""
        path, kind, mode, mtime_ns, uid, gid, size, extra, link = row
        e = cls(path, kind, mode, mtime_ns, uid, gid, size, link=link)
        if kind == SYMLINK:
            e.target = extra
        elif kind == FILE:
            e.chunks = [(h, n) for h, n in extra]
        return e

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
                row[8] = renumber.setdefault(e.link, len(renumber) + 1)
            rows.append(row)
        doc = {"format": FORMAT, "entries": rows}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes, name: str = "manifest") -> Manifest:
        """Parse and validate a manifest; raise on an unsafe or malformed one."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise IntegrityError(f"{name} has format {doc.get('format')}; upgrade stickyci")
            entries = [Entry.from_row(r) for r in doc["entries"]]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"{name} is not a valid manifest: {exc}") from exc
        m = cls({e.path: e for e in entries})
        validate(m, name)
        return m


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
