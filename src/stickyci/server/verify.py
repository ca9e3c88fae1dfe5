"""What the server checks before it stores an upload from a token it does not trust.

- A pack must hash to its name; an index must describe its pack exactly (``verify_index``);
  neither is ever replaced by different bytes.
- A ref must be a disk ref of its own key whose every snapshot is a manifest in the store, and
  every object it adds to the disk must be one the token may read or uploaded itself, so that
  knowing a digest is never a way to read it.

Proof of possession: a token that PUT a pack's bytes (the server saw them hash to the name) is
recorded as an uploader of that pack, in ``uploads.log`` under the state directory, so a ref
that lands after a server restart, or through another worker process of the same server, is
still accepted. Every process appends to the log and reads what the others appended before it
checks a ref.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..digest import Digest
from ..disks import DiskRef
from ..errors import ConflictError, Forbidden, IntegrityError, NotFound
from ..store import Backend, IndexEntry, decode_index, verify_index
from .auth import Principal
from .visibility import Visibility, sees_everything, snapshots_of

UPLOADS_FILE = "uploads.log"
RECENT_PACK_BYTES = 256 << 20
"""Bodies of recently uploaded packs kept to verify their indexes without a read back."""


class RecentPacks:
    """Pack bodies by id, least recently used dropped first, at most ``limit`` bytes."""

    def __init__(self, limit: int = RECENT_PACK_BYTES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._total = 0

    def add(self, pack_id: str, data: bytes) -> None:
        """Keep a pack body (unless it alone is over the limit)."""
        if len(data) > self.limit:
            return
        with self._lock:
            if pack_id in self._bodies:
                self._bodies.move_to_end(pack_id)
                return
            self._bodies[pack_id] = data
            self._total += len(data)
            while self._total > self.limit:
                self._total -= len(self._bodies.popitem(last=False)[1])

    def get(self, pack_id: str) -> bytes | None:
        """A kept body, or None."""
        with self._lock:
            return self._bodies.get(pack_id)


class Uploads:
    """Which token uploaded which pack: an append-only log that several processes share."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / UPLOADS_FILE
        self._lock = threading.Lock()
        self._packs: dict[str, list[str]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._read = 0  # bytes of the log taken in so far
        with self._lock:
            self._catch_up()

    def _catch_up(self) -> None:
        """Take in the lines appended since the last look (by any process)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._read)
                tail = f.read()
        except FileNotFoundError:
            return
        whole = tail[: tail.rfind(b"\n") + 1]  # a line still being appended waits
        self._read += len(whole)
        for line in whole.decode(errors="replace").splitlines():
            token, _, pack = line.partition(" ")
            if pack:
                self._add(token, pack)

    def _add(self, token: str, pack: str) -> bool:
        if (token, pack) in self._seen:
            return False
        self._seen.add((token, pack))
        self._packs.setdefault(token, []).append(pack)
        return True

    def record(self, token: str, pack_id: str) -> None:
        """Note that ``token`` uploaded pack ``pack_id`` (durably: a ref may follow later)."""
        with self._lock:
            if not self._add(token, pack_id):
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                # One write of a line: appends of several processes never interleave.
                os.write(fd, f"{token} {pack_id}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def packs_of(self, token: str) -> list[str]:
        """The packs ``token`` uploaded, newest last."""
        with self._lock:
            self._catch_up()
            return list(self._packs.get(token, ()))


class Verifier:
    """The checks on uploads, and the proof of possession they record."""

    def __init__(self, backend: Backend, state_dir: Path, visibility: Visibility) -> None:
        self.backend = backend
        self.visibility = visibility
        self.recent = RecentPacks()
        self.uploads = Uploads(state_dir)

    # -- packs and indexes ---------------------------------------------------------------

    def check_pack(self, name: str, data: bytes) -> None:
        """A pack must hash to its name (identical bytes, then, if it exists already)."""
        if Digest.of(data).hex != name.partition("/")[2]:
            raise IntegrityError(f"{name}: the body does not hash to its name; nothing stored")

    def pack_stored(self, who: Principal, pack_id: str, data: bytes) -> None:
        """Remember a verified pack upload: its body for its index, and that ``who`` sent it
        (possession, not knowledge of its digest or its index)."""
        self.recent.add(pack_id, data)
        self.uploads.record(who.id, pack_id)

    def check_index(self, name: str, data: bytes, trusted: bool) -> list[IndexEntry]:
        """Parse an index and, unless ``trusted``, verify it against its stored pack."""
        entries = decode_index(name, data)
        if trusted:
            return entries
        pack_id = name.partition("/")[2]
        pack = self.recent.get(pack_id)
        if pack is None:
            try:
                pack = self.backend.get(f"packs/{pack_id}")
            except NotFound as exc:
                raise IntegrityError(f"{name}: its pack packs/{pack_id} is not in the store; "
                                     "upload the pack before its index") from exc
        verify_index(name, pack, entries)
        return entries

    def check_same(self, name: str, data: bytes) -> bool:
        """For an immutable name: True if stored with exactly these bytes, False if absent;
        ``ConflictError`` if stored with other bytes."""
        try:
            stored = self.backend.get(name)
        except NotFound:
            return False
        if stored != data:
            raise ConflictError(f"{name} exists with other content and is immutable; nothing "
                                "stored (upload the pack's real index, or a new pack)")
        return True

    # -- refs ----------------------------------------------------------------------------

    def check_ref(self, who: Principal, key: str, data: bytes,
                  current: bytes | None) -> DiskRef:
        """The ref ``data`` for disk ``key``, if ``who`` may store it; else raise."""
        name = f"refs/{key}"
        ref = DiskRef.decode(data, key)
        added: set[bytes] = set()
        for snap in snapshots_of(ref):
            try:
                added |= self.visibility.objects(snap)
            except NotFound as exc:
                raise NotFound(f"{name}: snapshot {snap} is not in the store ({exc}); upload "
                               "its packs and indexes before the ref") from exc
        if sees_everything(who) or not added:
            return ref
        old = _decode_or_none(current)
        for snap in snapshots_of(old) if old else ():
            try:
                added -= self.visibility.objects(snap)
            except (NotFound, IntegrityError):
                continue
        rest = self.visibility.not_visible(who, added)
        for pack_id in reversed(self.uploads.packs_of(who.id)):
            if not rest:
                break
            rest -= {e.digest.raw for e in self.visibility.index_entries(pack_id) or ()}
        if rest:
            example = Digest(min(rest))
            raise Forbidden(f"disk {key}: the ref names {len(rest)} object(s) token {who.id} "
                            f"may not read (e.g. {example}); commit content from disks the "
                            "token may read, or upload the content itself")
        return ref


def _decode_or_none(data: bytes | None) -> DiskRef | None:
    if data is None:
        return None
    try:
        return DiskRef.decode(data)
    except IntegrityError:
        return None
