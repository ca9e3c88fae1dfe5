"""Disk refs: a key's history of generations, moved only by compare-and-swap.

A ref is a small JSON blob ``refs/<key>``. Every change re-reads it and writes it back with
``put_if`` against the etag it read, so two writers can never interleave a half-update; the
loser re-reads and tries again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import BackendError, IntegrityError, InvalidKey
from ..store import Backend

KEEP_GENERATIONS = 3
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
KEY_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200"


def check_key(key: str) -> str:
    """Return ``key`` if valid; otherwise raise ``InvalidKey`` naming the allowed characters."""
    if not _KEY.match(key):
        raise InvalidKey(f"invalid disk key {key!r}: use {KEY_RULE}")
    return key


@dataclass(slots=True)
class Generation:
    """One committed snapshot of a disk."""

    gen: int
    snapshot: str
    committed_at: float
    size: int
    files: int
    stored_bytes: int
    committer: str


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

    def generation(self, gen: int) -> Generation | None:
        """A generation by number, if it is still kept."""
        return next((g for g in self.generations if g.gen == gen), None)

    def encode(self) -> bytes:
        """JSON form."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> DiskRef:
        """Parse the JSON form."""
        try:
            doc = json.loads(data)
            gens = [Generation(**g) for g in doc.pop("generations")]
            return cls(generations=gens, **doc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # any JSON shape
            raise IntegrityError(f"disk ref is corrupt: {exc}") from exc


def _name(key: str) -> str:
    return f"refs/{check_key(key)}"


def read_ref(backend: Backend, key: str) -> DiskRef | None:
    """The current ref of ``key``, or None for an unknown disk."""
    got = backend.read_versioned(_name(key))
    return DiskRef.decode(got[0]) if got else None


def update_ref(backend: Backend, key: str,
               change: Callable[[DiskRef | None], DiskRef | None]) -> DiskRef | None:
    """Apply ``change`` to the current ref and write it with compare-and-swap, retrying on races.

    ``change`` may be called several times and must not have side effects; returning None
    leaves the ref as it is.
    """
    name = _name(key)
    for _ in range(100):
        got = backend.read_versioned(name)
        current = DiskRef.decode(got[0]) if got else None
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


def list_refs(backend: Backend) -> list[DiskRef]:
    """Every disk in the store, sorted by key."""
    refs = []
    for name in backend.list("refs"):
        got = backend.read_versioned(name)
        if got:
            refs.append(DiskRef.decode(got[0]))
    return sorted(refs, key=lambda r: r.key)


def delete_ref(backend: Backend, key: str) -> None:
    """Forget a disk (its objects go at the next ``gc``)."""
    backend.delete(_name(key))
