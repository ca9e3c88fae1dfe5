"""Disk refs: a key's history of generations, moved only by compare-and-swap.

A ref is a small JSON blob ``refs/<key>``. Every change re-reads it and writes it back with
``put_if`` against the etag it read, so two writers can never interleave a half-update; the
loser re-reads and tries again.

A ref is written by whoever holds a token for its key, a fork's pull request included, so its
bytes are untrusted input: :meth:`DiskRef.decode` turns them into typed values (a snapshot is a
:class:`Digest`, never a string that could become a path) or refuses them with an
``IntegrityError`` naming the ref. Listings skip a ref that does not parse, so one bad ref
never hides the others.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..digest import Digest
from ..errors import BackendError, IntegrityError, InvalidKey
from ..store import Backend

log = logging.getLogger("stickyci")
KEEP_GENERATIONS = 3
# A bound on untrusted input, far above what commits keep: gc loads one manifest per generation.
MAX_GENERATIONS = 64
MAX_COMMITTER = 256
MAX_PACK_HINTS = 1024
"""Most packs a generation names as holding its snapshot (a mount reads their indexes): a
bound on untrusted input and on a ref's size; a snapshot spread wider goes without."""
READERS = 8
"""Refs (and, for gc, indexes and manifests) read at once."""
T = TypeVar("T")
U = TypeVar("U")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
KEY_RULE = ("letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 "
            "characters")


def check_key(key: str) -> str:
    """Return ``key`` if valid; otherwise raise ``InvalidKey`` naming the allowed characters."""
    # fullmatch: "$" would also match before a trailing newline.
    if not _KEY.fullmatch(key):
        raise InvalidKey(f"invalid disk key {key!r}: use {KEY_RULE}")
    return key


class _Malformed(ValueError):
    """One field of a ref that is not what it must be; the message names the field."""


def _obj(doc: object, where: str, fields: frozenset[str],
         optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _Malformed(f"{where} is not a JSON object")
    missing, unknown = fields - doc.keys(), doc.keys() - fields - optional
    if missing:
        raise _Malformed(f"{where} lacks {', '.join(sorted(missing))}")
    if unknown:
        raise _Malformed(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    return doc


def _count(doc: dict[str, Any], name: str, where: str) -> int:
    value = doc[name]
    # bool is an int subclass in Python; True is not a size.
    if type(value) is not int or value < 0:
        raise _Malformed(f"{where}.{name} is not a non-negative integer")
    return value


def _time(doc: dict[str, Any], name: str, where: str) -> float:
    value = doc[name]
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _Malformed(f"{where}.{name} is not a timestamp")
    return float(value)


def _text(doc: dict[str, Any], name: str, where: str, most: int) -> str:
    value = doc[name]
    # Shown in terminals and on the dashboard: no control characters, no unbounded length.
    if not isinstance(value, str) or len(value) > most or not value.isprintable():
        raise _Malformed(f"{where}.{name} is not printable text of at most {most} characters")
    return value


def _digest(value: object, where: str) -> Digest:
    if not isinstance(value, str) or len(value) != 64:
        raise _Malformed(f"{where} is not a BLAKE3 digest")
    try:
        return Digest.parse(value)
    except ValueError:
        raise _Malformed(f"{where} is not a BLAKE3 digest") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _Malformed("a field appears twice")
    return doc


def _no_constant(name: str) -> float:
    raise _Malformed(f"{name} is not a JSON number")


_GEN_FIELDS = frozenset({"gen", "snapshot", "committed_at", "size", "files", "stored_bytes",
                         "committer"})
_GEN_OPTIONAL = frozenset({"packs"})
_REF_FIELDS = frozenset({"key", "created", "last_used", "generations"})


def as_hint(packs: set[str]) -> tuple[Digest, ...]:
    """:attr:`Generation.packs` for ``packs`` (``packs/<id>``): none when too many."""
    if len(packs) > MAX_PACK_HINTS:
        return ()
    return tuple(sorted(Digest.parse(p.split("/", 1)[1]) for p in packs))


@dataclass(frozen=True, slots=True)
class Generation:
    """One committed snapshot of a disk."""

    gen: int
    snapshot: Digest
    committed_at: float
    size: int
    files: int
    stored_bytes: int
    committer: str
    packs: tuple[Digest, ...] = ()
    """Packs holding the snapshot (its manifest and content), when the commit knew them all:
    a hint, so that a runner new to the store reads their indexes and not every index. A
    wrong hint costs only time (what it names is read and verified like any index)."""

    @property
    def pack_names(self) -> set[str]:
        """The hinted packs as store names (``packs/<id>``); :func:`as_hint` goes back."""
        return {f"packs/{p.hex}" for p in self.packs}

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the snapshot as bare hex)."""
        doc: dict[str, Any] = {
            "gen": self.gen, "snapshot": self.snapshot.hex, "committed_at": self.committed_at,
            "size": self.size, "files": self.files, "stored_bytes": self.stored_bytes,
            "committer": self.committer}
        if self.packs:
            doc["packs"] = [p.hex for p in self.packs]
        return doc

    @classmethod
    def parse(cls, doc: object, where: str) -> Generation:
        """A generation from its JSON form; ``_Malformed`` names the field at fault."""
        g = _obj(doc, where, _GEN_FIELDS, _GEN_OPTIONAL)
        packs = g.get("packs", [])
        if not isinstance(packs, list) or len(packs) > MAX_PACK_HINTS:
            raise _Malformed(f"{where}.packs is not a list of at most {MAX_PACK_HINTS} packs")
        return cls(_count(g, "gen", where), _digest(g["snapshot"], f"{where}.snapshot"),
                   _time(g, "committed_at", where), _count(g, "size", where),
                   _count(g, "files", where), _count(g, "stored_bytes", where),
                   _text(g, "committer", where, MAX_COMMITTER),
                   tuple(_digest(p, f"{where}.packs[{i}]") for i, p in enumerate(packs)))


@dataclass(slots=True)
class DiskRef:
    """A disk: its key, timestamps and newest-last generations."""

    key: str
    created: float
    last_used: float
    generations: list[Generation] = field(default_factory=list)

    @property
    def latest(self) -> Generation | None:
        """The newest generation, if any."""
        return self.generations[-1] if self.generations else None

    def add(self, gen: Generation) -> None:
        """Append ``gen`` as the newest generation, keeping the last ``KEEP_GENERATIONS``.
        Only the newest keeps its pack hint: it is the one a mount reads, and refs stay small."""
        older = [replace(g, packs=()) for g in self.generations]
        self.generations = [*older, gen][-KEEP_GENERATIONS:]

    def generation(self, gen: int) -> Generation | None:
        """A generation by number, if it is still kept."""
        return next((g for g in self.generations if g.gen == gen), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"key": self.key, "created": self.created, "last_used": self.last_used,
                "generations": [g.as_dict() for g in self.generations]}

    def encode(self) -> bytes:
        """JSON form, as bytes."""
        return json.dumps(self.as_dict(), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, key: str | None = None) -> DiskRef:
        """Parse and validate the JSON form of the ref read under ``refs/<key>``.

        Pass ``key`` whenever the name is known: a ref must name the key it is stored under.
        Raise ``IntegrityError`` naming the ref and the field at fault.
        """
        name = f"refs/{key}" if key is not None else "a disk ref"
        try:
            doc = json.loads(data, object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
            r = _obj(doc, "ref", _REF_FIELDS)
            if not isinstance(r["key"], str) or not _KEY.fullmatch(r["key"]):
                raise _Malformed(f"ref.key is not a valid disk key ({KEY_RULE})")
            if key is not None and r["key"] != key:
                raise _Malformed(f"ref.key {r['key']!r} is not the key it is stored under")
            if not isinstance(r["generations"], list):
                raise _Malformed("ref.generations is not a list")
            if len(r["generations"]) > MAX_GENERATIONS:
                raise _Malformed(f"ref.generations has more than {MAX_GENERATIONS} entries")
            gens = [Generation.parse(g, f"generations[{i}]")
                    for i, g in enumerate(r["generations"])]
            if any(a.gen >= b.gen for a, b in itertools.pairwise(gens)):
                raise _Malformed("generation numbers do not strictly increase")
            return cls(r["key"], _time(r, "created", "ref"), _time(r, "last_used", "ref"), gens)
        except (ValueError, RecursionError) as exc:  # _Malformed, or not JSON at all
            why = exc if isinstance(exc, _Malformed) else "not valid JSON"
            fix = (f"; remove it with `stickyci disk rm {key}`" if key is not None
                   and _KEY.fullmatch(key) else "")
            raise IntegrityError(f"{name} is malformed: {why}{fix}") from None


def _name(key: str) -> str:
    return f"refs/{check_key(key)}"


def read_ref(backend: Backend, key: str) -> DiskRef | None:
    """The current ref of ``key``, or None for an unknown disk."""
    got = backend.read_versioned(_name(key))
    return DiskRef.decode(got[0], key) if got else None


def update_ref(backend: Backend, key: str,
               change: Callable[[DiskRef | None], DiskRef | None]) -> DiskRef | None:
    """Apply ``change`` to the current ref and write it with compare-and-swap, retrying on races.

    ``change`` may be called several times and must not have side effects; returning None
    leaves the ref as it is.
    """
    name = _name(key)
    for _ in range(100):
        got = backend.read_versioned(name)
        current = DiskRef.decode(got[0], key) if got else None
        new = change(current)
        if new is None:
            return current
        if backend.put_if(name, new.encode(), got[1] if got else None):
            return new
    raise BackendError(f"disk {key}: gave up after 100 concurrent ref updates; retry")


def touch(backend: Backend, key: str) -> None:
    """Record that ``key`` was used now (eviction reads ``last_used``)."""
    now = time.time()

    def change(ref: DiskRef | None) -> DiskRef | None:
        if ref is None:
            return None
        ref.last_used = now
        return ref

    update_ref(backend, key, change)


@dataclass(slots=True)
class Listing:
    """Every ref that parses, sorted by key, and why each other one was skipped."""

    refs: list[DiskRef] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # ref name → one-line reason


def each(fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
    """``fn`` of every item, in order, ``READERS`` at a time: reading every ref or index of
    a store is a wait for round trips, not work."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(READERS, len(items))) as pool:
        return list(pool.map(fn, items))


def scan_refs(backend: Backend) -> Listing:
    """Read every ref; one that does not parse is skipped, logged as a warning, and listed."""
    out = Listing()

    def read(name: str) -> DiskRef | IntegrityError | InvalidKey | None:
        key = name.removeprefix("refs/")
        try:
            got = backend.read_versioned(_name(key))
            return DiskRef.decode(got[0], key) if got else None
        except (IntegrityError, InvalidKey) as exc:
            return exc

    names = backend.list("refs")
    for name, got in zip(names, each(read, names), strict=True):
        if isinstance(got, DiskRef):
            out.refs.append(got)
        elif got is not None:
            out.skipped[name] = str(got)
            log.warning("skipping %s", got)
    out.refs.sort(key=lambda r: r.key)
    return out


def list_refs(backend: Backend) -> list[DiskRef]:
    """Every disk in the store whose ref parses, sorted by key (see :func:`scan_refs`)."""
    return scan_refs(backend).refs


def exists(backend: Backend, key: str) -> bool:
    """Whether ``refs/<key>`` exists, parseable or not."""
    return backend.stat(_name(key)) is not None


def delete_ref(backend: Backend, key: str) -> None:
    """Forget a disk (its objects go at the next ``gc``)."""
    backend.delete(_name(key))
