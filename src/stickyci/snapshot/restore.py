"""Restoring a snapshot into an empty directory: bytes, modes, times, links and ownership.

Everything is created through ``fsutil.Opener`` (each path resolved from the root's fd without
following symlinks), so a process racing the restore cannot make it write outside its target.

Owners and the setuid and setgid bits come from whoever wrote the manifest, which may be any
writer the store accepts: they are restored only when the mount trusts them (``trust_owners``,
as a ``/nix`` disk needs); otherwise the tree belongs to the user restoring it and carries no
setuid or setgid bit. The sticky bit only restricts deletion and is kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from ..digest import Digest
from ..errors import IntegrityError, UsageError
from ..forked import PARALLEL_MIN_BYTES, forked_runs
from ..fsutil import Opener, Tree, changed_error
from ..store import ObjectStore
from .model import DIR, FILE, SYMLINK, ChunkRef, Entry, Manifest, ref_parts, validate

_ROOT = os.geteuid() == 0


WriteContent = Callable[[Entry, int], None]


def restore(store: ObjectStore, m: Manifest, root: str, *, trust_owners: bool = False) -> None:
    """Write the tree ``m`` describes into ``root`` (existing, empty), content from the store;
    owners and setuid/setgid bits only with ``trust_owners``."""

    content = Content(store)

    def write(e: Entry, fd: int) -> None:
        for ref in e.chunks:
            data = content.read(ref, e.path)
            while data:
                data = data[os.write(fd, data):]

    def where(e: Entry) -> tuple[str, int]:
        loc = store.locate(Digest(bytes.fromhex(e.chunks[0][0]))) if e.chunks else None
        return (loc.pack, loc.offset) if loc else ("", 0)

    # In pack order, each pack is read once, front to back, however the tree was walked.
    materialize(m, root, write, order=where, trust_owners=trust_owners)


class Content:
    """The bytes chunk references name, read from ``store`` and verified: a whole object, or a
    slice of a bundle, which is decoded once for the files of it that come in a row (a
    restore in pack order reads them so).

    ``whole_pack`` is passed on to ``ObjectStore.get``: for readers that go through packs in
    order.
    """

    def __init__(self, store: ObjectStore, *, whole_pack: bool = True) -> None:
        self.store = store
        self.whole_pack = whole_pack
        self._bundle: tuple[Digest | None, bytes] = (None, b"")

    def read(self, ref: ChunkRef, path: str) -> memoryview:
        """The content ``ref`` names, of the file ``path``; ``IntegrityError`` when the object
        does not hold the bytes the reference claims."""
        digest, length, offset = _parse(ref, path)
        if offset is None:  # the whole object, which must be as long as the reference says
            data, offset = memoryview(self.object(digest)), 0
            piece = data if len(data) == length else data[:0]
        else:
            if self._bundle[0] != digest:
                self._bundle = (digest, self.object(digest))
            data = memoryview(self._bundle[1])
            piece = data[offset:offset + length]
        if len(piece) != length:
            raise IntegrityError(f"object {digest} holds {len(data)} bytes, but the manifest "
                                 f"reads {length} at {offset} of it for {path}; the snapshot "
                                 "is corrupt or forged")
        return piece

    def holds(self, ref: ChunkRef, data: bytes, path: str) -> bool:
        """True if ``data``, read from the file ``path``, is the content ``ref`` names: a
        whole object's by its digest, a bundle's slice by the bundle's bytes (read here)."""
        digest, length, offset = _parse(ref, path)
        if offset is None:
            return len(data) == length and Digest.of(data) == digest
        return self.read(ref, path) == data

    def object(self, digest: Digest) -> bytes:
        """The object ``digest``, verified."""
        return self.store.get(digest, whole_pack=self.whole_pack)


def _parse(ref: ChunkRef, path: str) -> tuple[Digest, int, int | None]:
    """A chunk reference's digest, length and offset (None: the whole object). Checked here as
    well as by ``validate``: a manifest read to extend it is not validated."""
    parts = ref_parts(ref)
    if parts is None:
        raise IntegrityError(f"the manifest names {ref!r} as the content of {path}; the "
                             "snapshot is corrupt or forged")
    hexd, length, offset = parts
    return Digest(bytes.fromhex(hexd)), length, offset


def materialize(m: Manifest, root: str, write_content: WriteContent,
                order: Callable[[Entry], tuple[str, int]] | None = None, *,
                trust_owners: bool = False, parallel: bool = True) -> None:
    """Write the tree ``m`` describes into ``root``, which must exist and be empty.

    ``write_content`` fills each regular file (once per hardlink group) through an open fd;
    ``order`` may sort the files for the content source's sake. Without ``trust_owners`` the
    tree is owned by the caller and setuid/setgid bits are dropped. ``parallel=False`` keeps
    to this process (writing content that is cheap, forked workers cost more than they save).

    The manifest is validated first, so an unsafe entry is refused before anything is written.
    Directories get their final modes and times last, since writing into them changes both.
    """
    validate(m)
    tree = Tree.at(root)
    meta = Metadata(trust_owners)
    with Opener(tree) as op:
        if os.listdir(op.root):
            raise UsageError(f"{root} is not empty; restore needs an empty directory")
        entries = m.sorted_entries()
        dirs = [e for e in entries if e.kind == DIR]
        for e in dirs:
            parent, name = op.parent(e.path)
            with _creating(tree, e):
                os.mkdir(name, 0o700, dir_fd=parent)

        leaders: dict[int, str] = {}
        files: list[Entry] = []
        links: list[Entry] = []
        for e in entries:
            if e.kind != FILE:
                continue
            if e.link and e.link in leaders:
                links.append(e)
                continue
            if e.link:
                leaders[e.link] = e.path
            files.append(e)

        if order:
            files.sort(key=order)
        if not parallel or sum(e.size for e in files) < PARALLEL_MIN_BYTES:
            for e in files:
                _write_file(op, e, write_content, meta)
        else:
            # Contiguous runs of files, so each worker reads its packs front to back.
            def work(run: Iterable[Entry]) -> None:
                with Opener(tree) as mine:
                    for e in run:
                        _write_file(mine, e, write_content, meta)

            forked_runs(files, work)
        for e in links:
            with _creating(op.tree, e):
                op.link(leaders[e.link], e.path)
        for e in entries:
            if e.kind == SYMLINK:
                parent, name = op.parent(e.path)
                with _creating(tree, e):
                    os.symlink(e.target, name, dir_fd=parent)
                meta.apply_to_symlink(parent, name, e)
        for e in reversed(dirs):
            fd = op.open(e.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                meta.apply(fd, e)
            finally:
                os.close(fd)


class Metadata:
    """Sets an entry's metadata on what a restore created, as far as it is trusted: owners and
    setuid/setgid bits only with ``trust_owners``."""

    def __init__(self, trust_owners: bool) -> None:
        self.chown = trust_owners and _ROOT
        self.keep = 0o7777 if trust_owners else 0o1777

    def apply(self, fd: int, e: Entry) -> None:
        """Owner (if trusted), mode and mtime of the file or directory open as ``fd``."""
        if self.chown:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode & self.keep)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def apply_to_symlink(self, parent: int, name: str, e: Entry) -> None:
        """Owner (if trusted) and mtime of the symlink ``name`` in ``parent``."""
        if self.chown:
            os.chown(name, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)


@contextlib.contextmanager
def _creating(tree: Tree, e: Entry) -> Iterator[None]:
    try:
        yield
    except FileExistsError as exc:  # only a process racing the restore can have put it there
        raise changed_error(tree.path, e.path) from exc


def _write_file(op: Opener, e: Entry, write_content: WriteContent, meta: Metadata) -> None:
    fd = op.open(e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_content(e, fd)
        meta.apply(fd, e)
    finally:
        os.close(fd)
