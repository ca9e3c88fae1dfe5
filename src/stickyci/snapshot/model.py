"""The manifest: a deterministic, immutable description of a directory tree.

Entries are sorted by path (so a parent precedes its children) and serialised as compact JSON
arrays, one per line, in one JSON array headed by the format and the tree's totals::

    [{"format":3,"files":1,"size":1180}
    ,["src","dir",493,...]
    ,["src/main.c","file",420,...]
    ]

A file's content is a list of chunk references: ``[hex digest, length]`` names a whole object;
``[hex digest, length, offset]`` (format 3) names ``length`` bytes at ``offset`` of one, a
*bundle*: small files are stored concatenated, several to an object, so that they compress
together (see ``build``).

The BLAKE3 of the serialised manifest is the snapshot id. One entry per line, in order, is
what lets an incremental commit read only the lines of the paths it changed (``decode(...,
lazy=True)``) and write its manifest by splicing them into its base's bytes
(``Manifest.encode_after``), counting from the header; format 1 (one JSON object, every entry
on one line) and format 2 (no bundles) are still read. Paths are relative POSIX paths. A manifest
can come from an untrusted store, so ``validate`` runs before anything is written from one
(see ``restore``); reading one to compare or extend it does not need it.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import gc
import os
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import IntegrityError, UnsafePath

FORMAT = 3
# Headers a commit can splice into and read lazily (format 2 lines are format 3's, no bundles).
_HEAD_TOTALS = (b'[{"format":3,"files":', b'[{"format":2,"files":')
_END = b',"\\u0000"]'  # how the NUL that ends each row while it is encoded comes out
DIR, FILE, SYMLINK = "dir", "file", "symlink"
KINDS = frozenset({DIR, FILE, SYMLINK})
MODE_BITS = 0o7777  # permissions with setuid, setgid and sticky: all a manifest records
ID_MAX = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown(2), so it is no owner
SIZE_MAX = 2**63 - 1
MTIME_LIMIT = 2**63 * 10**9  # nanoseconds whose seconds fit a 64-bit time_t
_HEX = re.compile(r"[0-9a-f]{64}")


# A chunk reference: [hex digest, length] or [hex digest, length, offset in a bundle]. A list,
# not a tuple, because that is what JSON gives back, and converting 50 000 of them on every
# commit was a measurable cost.
ChunkRef = list[Any]


@dataclass(slots=True)
class Entry:
    """One path in a tree. ``chunks`` holds a file's chunk references, in order."""

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


class Manifest:
    """A whole tree: entries by path.

    Read lazily from the store (``decode(..., lazy=True)``), a manifest answers ``get`` and
    ``under`` from its bytes, parsing the lines it is asked about; ``patched`` describes a
    tree as such a base plus changes. Both become a plain dict of entries only when something
    asks for ``entries``: an incremental commit of a 52k-entry tree reads a few hundred lines
    instead of all of them (decoding them all was 85 ms of its 0.3 s).
    """

    __slots__ = ("_base", "_changes", "_entries", "_lines", "_seen", "_totals", "encoded",
                 "name")

    def __init__(self, entries: dict[str, Entry] | None = None, name: str = "manifest",
                 encoded: bytes | None = None) -> None:
        self._entries: dict[str, Entry] | None = {} if entries is None else entries
        self.name = name  # what errors call it
        # The bytes this manifest was decoded from, entries in the order of ``entries``: what
        # ``encode_after`` splices a change into.
        self.encoded = encoded
        self._lines: list[bytes] | None = None  # of ``encoded``: entry i is on line i + 1
        # Where lookups in a lazy manifest found each path: its line (or where it would be)
        # and its entry.
        self._seen: dict[str, tuple[int, Entry | None]] = {}
        self._totals: tuple[int, int] | None = None  # (files, size) its header states
        self._base: Manifest | None = None
        self._changes: dict[str, Entry | None] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"Manifest({self.name!r})"

    @property
    def entries(self) -> dict[str, Entry]:
        """Every entry by path (a lazy manifest is parsed whole the first time)."""
        if self._entries is None:
            if self._base is not None:
                merged = dict(self._base.entries)
                for p, e in self._changes.items():
                    if e is None:
                        merged.pop(p, None)
                    else:
                        merged[p] = e
                self._entries = merged
            else:
                assert self.encoded is not None
                self._entries = Manifest.decode(self.encoded, self.name).entries
        return self._entries

    @classmethod
    def patched(cls, base: Manifest, changes: dict[str, Entry | None]) -> Manifest:
        """``base`` with ``changes`` applied (``None`` removes a path), read lazily: only the
        changed paths are looked up in ``base`` until something asks for every entry."""
        m = cls(name=base.name)
        m._entries, m._base, m._changes = None, base, changes
        return m

    def get(self, path: str) -> Entry | None:
        """The entry at ``path``, if any."""
        if self._entries is not None:
            return self._entries.get(path)
        if self._base is not None:
            return self._changes[path] if path in self._changes else self._base.get(path)
        return self._locate(path)[1]

    def under(self, roots: Iterable[str]) -> set[str]:
        """The paths below any of ``roots`` (the roots themselves not included)."""
        # Whatever lies under a path is one run of the sorted paths: a search per root,
        # instead of walking every ancestor of every path in the tree.
        out: set[str] = set()
        if self._entries is not None and not self._entries:
            return out  # a new disk's base: every path of its first commit is a root
        prefixes = {r + "/" for r in roots}
        if not prefixes:
            return out
        if self._entries is None and self._base is None:
            lines = self._lines_()
            for prefix in prefixes:
                raw = prefix.encode(errors="surrogateescape")
                i = self._find(raw)
                while i < len(lines) - 1 and (p := _key(lines[i], self.name)).startswith(raw):
                    out.add(p.decode())
                    i += 1
            return out
        paths = sorted(self.entries)
        for prefix in prefixes:
            i = bisect.bisect_left(paths, prefix)
            while i < len(paths) and paths[i].startswith(prefix):
                out.add(paths[i])
                i += 1
        return out

    def sorted_entries(self) -> list[Entry]:
        """Entries in path order (parents first)."""
        return [self.entries[p] for p in sorted(self.entries)]

    @property
    def files(self) -> int:
        """How many files the tree holds."""
        return self.totals[0]

    @property
    def size(self) -> int:
        """Total bytes of file content (hardlinked content counted once)."""
        return self.totals[1]

    @property
    def totals(self) -> tuple[int, int]:
        """``(files, size)`` in one pass; without parsing every entry when the header or the
        base states them (a change to a hardlinked path counts everything: groups are
        counted once)."""
        if self._entries is not None:
            return _totals(self._entries.values())
        if self._base is None:
            assert self._totals is not None  # read lazily only when its header states them
            return self._totals
        if any_linked(self._changes, self._base, self):
            return _totals(self.entries.values())
        files, size = self._base.totals
        for p, new in self._changes.items():
            for e, sign in ((self._base.get(p), -1), (new, 1)):
                if e is not None and e.kind == FILE:
                    files += sign
                    size += sign * e.size
        return files, size

    def chunk_digests(self) -> set[str]:
        """Every chunk this tree references."""
        return {ref[0] for e in self.entries.values() for ref in e.chunks}

    def encode(self) -> bytes:
        """Deterministic serialisation; hardlink groups are renumbered in path order."""
        with paused_gc():
            return self._encode()

    def _encode(self) -> bytes:
        renumber: dict[int, int] = {}
        rows = []
        entries = self.sorted_entries()
        for e in entries:
            row = e.to_row()
            if e.link:
                row[9] = renumber.setdefault(e.link, len(renumber) + 1)
            row.append("\0")
            rows.append(row)
        escaped = False
        try:
            body = orjson.dumps(rows)
        except TypeError:
            # A name or link target that is not UTF-8 (os gives it back surrogate-escaped)
            # cannot be a JSON string; such values are stored as their raw bytes in base64.
            for row in rows:
                row[0], row[8] = _escape(row[0]), _escape(row[8])
            escaped, body = True, orjson.dumps(rows)
        head = _header(*_totals(entries), escaped)
        if not rows:
            return head + b"\n]"
        # One dumps for all rows, each ending in a NUL string, then a line break where each
        # ends (only a row ends in a string followed by a comma): dumps row by row costs as
        # much again, and ten times that in a process whose heap a commit has churned (52k
        # rows: 0.5 s, most of it in the kernel).
        return head + b"\n," + body[1:-len(_END) - 1].replace(_END + b",", b"]\n,") + b"]\n]"

    def encode_after(self, base: Manifest, touched: Collection[str]) -> bytes:
        """``encode()`` of a manifest that differs from ``base`` (decoded from the store) at
        ``touched`` paths only, every other entry being ``base``'s: the changed lines spliced
        into ``base``'s bytes, at a cost in proportion to the change (an incremental commit of
        a 38k-entry tree: 6 ms, against 50 ms to encode it all).

        The same bytes as ``encode()`` whenever ``base`` was written by it; a change to a
        hardlinked entry (groups are numbered across the whole manifest) or to a name that
        is not UTF-8 encodes everything, and so does a base whose header does not state its
        totals (written before they were in it).
        """
        spliced = self._splice(base, sorted(touched)) if base.encoded else None
        return self.encode() if spliced is None else spliced

    def _splice(self, base: Manifest, changed: list[str]) -> bytes | None:
        assert base.encoded is not None
        if not base.encoded.startswith(_HEAD_TOTALS):
            return None
        if any_linked(changed, base, self):
            return None
        lines = base._lines_()
        try:
            out = [_header(*self.totals, False)]
            at = 1  # the next line of ``base`` not yet copied
            for p in changed:
                i, old = base._locate(p)
                out += lines[at:i]
                at = i + (old is not None)
                if (e := self.get(p)) is not None:
                    out.append(b"," + orjson.dumps(e.to_row()))
        except TypeError:  # a name that is not UTF-8
            return None
        out += lines[at:]
        return b"\n".join(out)

    def _lines_(self) -> list[bytes]:
        if self._lines is None:
            assert self.encoded is not None
            self._lines = self.encoded.split(b"\n")
        return self._lines

    def _locate(self, path: str) -> tuple[int, Entry | None]:
        """The line of ``path`` in a lazy manifest (or where it would be) and its entry."""
        found = self._seen.get(path)
        if found is None:
            # A name that is not UTF-8 is in no manifest read lazily (those are read whole),
            # but may be asked about: its raw bytes find where it would be.
            raw = path.encode(errors="surrogateescape")
            i, lines, e = self._find(raw), self._lines_(), None
            if i < len(lines) - 1 and _key(lines[i], self.name) == raw:
                try:
                    e = Entry.from_row(orjson.loads(lines[i][1:]))
                except (ValueError, TypeError) as exc:
                    raise IntegrityError(f"{self.name} is not a valid manifest: {exc}") from exc
            found = self._seen[path] = (i, e)
        return found

    def _find(self, key: bytes) -> int:
        """The first line (of the entries') whose path, as UTF-8, does not sort before
        ``key``: UTF-8 sorts as the code points do, so the lines' bytes are compared as they
        are."""
        lines, name = self._lines_(), self.name
        lo, hi = 1, len(lines) - 1
        while lo < hi:  # bisect with a key function costs twice as much per probe
            mid = (lo + hi) // 2
            if _key(lines[mid], name) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @classmethod
    def decode(cls, data: bytes, name: str = "manifest", *, lazy: bool = False) -> Manifest:
        """Parse a manifest; raise ``IntegrityError`` on a malformed one.

        ``lazy`` parses only the header of a format 2 or 3 manifest that states its totals, and
        each line when it is asked about (see the class); a malformed line is then reported
        when it is read. Any other manifest is parsed whole, as without ``lazy``.
        """
        try:
            if lazy and (m := cls._lazy(data, name)) is not None:
                return m
            with paused_gc():
                return cls._decode(data, name)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"{name} is not a valid manifest: {exc}") from exc

    @classmethod
    def _lazy(cls, data: bytes, name: str) -> Manifest | None:
        """``data`` read lazily, or None where its header is not one this reads lazily."""
        end = data.find(b"\n")
        if not data.startswith(_HEAD_TOTALS) or end < 0 or not data.endswith(b"\n]"):
            return None
        try:
            head = orjson.loads(data[1:end])
        except ValueError:
            return None  # a header on several lines: only a whole parse can tell
        files, size = head.get("files"), head.get("size")
        if (set(head) != {"format", "files", "size"} or not _int(files, 0, SIZE_MAX)
                or not _int(size, 0, SIZE_MAX)):
            return None
        m = cls(name=name, encoded=data)
        m._entries, m._totals = None, (files, size)
        return m

    @classmethod
    def _decode(cls, data: bytes, name: str) -> Manifest:
        doc = orjson.loads(data)
        if isinstance(doc, list) and doc:
            head, rows, encoded = doc[0], doc[1:], data
        else:  # format 1
            head, rows, encoded = doc, doc["entries"], None
        version = head.get("format")
        if version not in (1, 2, FORMAT) or (version == 1) != (encoded is None):
            raise IntegrityError(f"{name} has format {version}; upgrade stickyci")
        if head.get("escaped"):
            for row in rows:
                row[0], row[8] = _unescape(row[0]), _unescape(row[8])
        entries = [Entry.from_row(r) for r in rows]
        m = cls({e.path: e for e in entries}, name, encoded)
        if "files" in head:
            m._totals = (head["files"], head["size"])
        return m

    def check_totals(self) -> None:
        """Raise ``IntegrityError`` if the header states totals its entries do not have."""
        if self._totals is not None and self._entries is not None:
            actual = self.totals
            if actual != self._totals:
                raise IntegrityError(
                    f"{self.name}: its header states {self._totals[0]} files of "
                    f"{self._totals[1]} bytes, its entries {actual[0]} of {actual[1]}; the "
                    "snapshot is corrupt or forged, refusing to restore it")


def _header(files: int, size: int, escaped: bool) -> bytes:
    head: dict[str, Any] = {"format": FORMAT, "escaped": True} if escaped else {"format": FORMAT}
    return b"[" + orjson.dumps({**head, "files": files, "size": size})


def _totals(entries: Iterable[Entry]) -> tuple[int, int]:
    """(files, bytes of content) of ``entries``, hardlinked content counted once."""
    seen: set[int] = set()
    files = size = 0
    for e in entries:
        if e.kind != FILE:
            continue
        files += 1
        if e.link:
            if e.link in seen:
                continue
            seen.add(e.link)
        size += e.size
    return files, size


def _key(line: bytes, name: str) -> bytes:
    """The path of an entry line (format 2 or 3), as UTF-8.

    The path is the line's first string and the kind its second, and a quote inside a JSON
    string is always escaped, so the first ``","`` ends the path.
    """
    end = line.find(b'","', 3)
    if end < 0 or not line.startswith(b',["'):
        raise IntegrityError(f"{name} is not a valid manifest: a line is not an entry")
    raw = line[3:end]
    if b"\\" not in raw:
        return raw
    try:
        return str(orjson.loads(line[2 : end + 1])).encode()
    except ValueError as exc:
        raise IntegrityError(f"{name} is not a valid manifest: {exc}") from exc


def any_linked(paths: Iterable[str], *manifests: Manifest) -> bool:
    """True if any of ``paths`` is hardlinked in any of ``manifests``."""
    return any((e := m.get(p)) is not None and e.link for p in paths for m in manifests)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a block builds a large acyclic structure.

    A manifest of 38k entries is some 150k lists and objects; every few hundred allocations
    the collector would walk them all again (decoding a 6.4 MB manifest: 85-150 ms with it,
    60 ms without; the orjson parse alone 124 ms against 33 ms).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            # What the block built lives on: it goes straight to the oldest generation
            # (frozen, then thawed there), or the first young collection after this would
            # walk all of it (decoding the 10 MB manifest of a 52k-file tree: ~20 ms).
            # Inside a frozen region (``_fill_forked``) it stays frozen with the rest.
            outer = gc.get_freeze_count() > 0
            gc.freeze()
            if not outer:
                gc.unfreeze()
            gc.enable()


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


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def ref_parts(ref: object) -> tuple[str, int, int | None] | None:
    """A chunk reference's hex digest, length and offset (None: the whole object); None if
    ``ref`` is no ``[64 hex digits, length]`` or ``[64 hex digits, length, offset]``."""
    if (isinstance(ref, list) and len(ref) in (2, 3) and isinstance(ref[0], str)
            and _HEX.fullmatch(ref[0]) and _int(ref[1], 1, SIZE_MAX)
            and (len(ref) == 2 or _int(ref[2], 0, SIZE_MAX))):
        return ref[0], ref[1], ref[2] if len(ref) == 3 else None
    return None


def _check_fields(e: Entry) -> str | None:
    """What is impossible about ``e``'s fields, if anything: no filesystem gives such values."""
    if not isinstance(e.kind, str) or e.kind not in KINDS:
        return f"unknown type {e.kind!r}"
    if not _int(e.mode, 0, MODE_BITS):
        return f"mode {e.mode!r} (not permission bits 0..0o7777)"
    if not _int(e.uid, 0, ID_MAX) or not _int(e.gid, 0, ID_MAX):
        return f"owner {e.uid!r}:{e.gid!r} (not ids 0..{ID_MAX})"
    if not _int(e.mtime_ns, -MTIME_LIMIT, MTIME_LIMIT - 1):
        return f"mtime {e.mtime_ns!r} (not nanoseconds a filesystem can hold)"
    if not _int(e.size, 0, SIZE_MAX) or not _int(e.link, 0, SIZE_MAX):
        return f"size {e.size!r} or hardlink group {e.link!r} (not a count)"
    if not isinstance(e.chunks, list) or not isinstance(e.target, str):
        return "chunks that are not a list or a link target that is not a string"
    if e.kind != FILE and (e.size or e.chunks or e.link):
        return "content, which only files have"
    if (e.kind == SYMLINK) != bool(e.target) or "\0" in e.target:
        return f"link target {e.target!r} (only symlinks have one, without NUL)"
    total = 0
    for ref in e.chunks:
        if ref_parts(ref) is None:
            return f"chunk reference {ref!r} (not [64 hex digits, length(, offset)])"
        total += ref[1]
    if e.kind == FILE and total != e.size:
        return f"chunks of {total} bytes for a size of {e.size}"
    return None


def validate(m: Manifest, name: str | None = None) -> None:
    """Check every entry before anything is written from ``m``.

    Paths must be relative and clean, and every parent a directory entry: that second rule is
    what stops a restore from writing through a symlink, since a child can only be created
    under a directory the restore itself made. Fields must be values a filesystem can hold
    (a mode of permission bits, ids, sizes, times): anything else is corrupt or hostile data,
    refused as ``IntegrityError`` rather than passed on to a system call.
    """
    name = name or m.name
    for path, e in m.entries.items():
        if not isinstance(path, str) or path != e.path:
            raise IntegrityError(f"{name}: entry {path!r} has a malformed path; refusing to "
                                 "restore it")
        check_path(path)
        problem = _check_fields(e)
        if problem is not None:
            raise IntegrityError(f"{name}: entry {path!r} has {problem}; the snapshot is "
                                 "corrupt or forged, refusing to restore it")
        parent = path.rpartition("/")[0]
        if parent and (parent not in m.entries or m.entries[parent].kind != DIR):
            raise UnsafePath(
                f"manifest path {path!r} would be written through {parent!r}, which is not a "
                "directory in the snapshot; refusing to restore it")
    m.check_totals()
