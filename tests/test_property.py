"""Property: any tree survives snapshot → store → restore, directly and through a sticky disk.

Random trees hold empty, small, chunk-boundary and multi-MiB files, nested and empty dirs,
relative, dangling and absolute symlinks, hardlink groups, assorted modes, mtimes to the
nanosecond (before 1970 too) and, as root, owners. "Identical" means what ``lstat`` and
``readlink`` see: type, mode, mtime, owner, bytes, link target and which paths share an inode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import IS_ROOT, STRATEGIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stickyci import disks
from stickyci.disks import refs
from stickyci.fsutil import remove_tree
from stickyci.snapshot import load_manifest, restore, snapshot_tree
from stickyci.store import LocalBackend, ObjectStore

# Setuid, setgid and sticky bits, which a restore keeps only when it trusts owners.
FILE_MODES = [0o755, 0o644, 0o600, 0o444, 0o700, *([0o4755, 0o2750] if IS_ROOT else [])]
# Without root a directory must stay readable and searchable by its owner to be scanned.
DIR_MODES = ([0o755, 0o700, 0o555, 0o444, 0o711, 0o2775, 0o1777] if IS_ROOT
             else [0o755, 0o700, 0o750])
OWNERS = [0, 1000, 65534] if IS_ROOT else [os.getuid()]
MTIMES = st.one_of(
    st.integers(-(2**31) * 10**9, 2**33 * 10**9),  # 1901 .. 2242, to the nanosecond
    st.sampled_from([0, 1, 10**9, 1_700_000_000_123_456_789]),
)
# Names are bytes on Linux: "\udcff" is how Python spells the byte 0xff that is not UTF-8.
NAME_CHARS = [*"abcXY01_-. é☃,:\\\n", os.fsdecode(b"\xff")]
NAMES = st.lists(st.sampled_from(NAME_CHARS), min_size=1, max_size=6).map("".join).filter(
    lambda n: n not in (".", ".."))
SYMLINK_TARGETS = ["nowhere", "../up/../x", "/nonexistent/stickyci/target", "/etc", ".", "a b",
                   "/", "dir/", "../../../../etc/passwd", os.fsdecode(b"/tmp/caf\xe9")]
KiB, MiB = 1 << 10, 1 << 20


def _seeded(seed: int, size: int, compressible: bool) -> bytes:
    rnd = random.Random(seed)
    if compressible:
        return (rnd.randbytes(97) * (size // 97 + 1))[:size]
    return rnd.randbytes(size)


CONTENT = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(_seeded, st.integers(0, 2**32), st.integers(60 * KiB, 70 * KiB), st.booleans()),
    st.builds(_seeded, st.integers(0, 2**32), st.integers(MiB + 1, 5 * MiB // 2), st.booleans()),
)


@dataclass
class Meta:
    mode: int
    mtime_ns: int
    uid: int
    gid: int


@dataclass
class Tree:
    dirs: dict[str, Meta] = field(default_factory=dict)
    files: dict[str, tuple[bytes, Meta]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # extra hardlink -> file it links to
    symlinks: dict[str, tuple[str, Meta]] = field(default_factory=dict)

    def kind(self, path: str) -> str | None:
        for kind, table in (("dir", self.dirs), ("file", self.files), ("file", self.links),
                            ("symlink", self.symlinks)):
            if path in table:
                return kind
        return None

    def linked(self) -> set[str]:
        """Paths that belong to a hardlink group."""
        return set(self.links) | set(self.links.values())

    def __repr__(self) -> str:  # keep hypothesis' falsifying examples readable
        files = {p: (len(c), oct(m.mode)) for p, (c, m) in self.files.items()}
        return (f"Tree(dirs={ {p: oct(m.mode) for p, m in self.dirs.items()} }, files={files}, "
                f"links={self.links}, symlinks={ {p: t for p, (t, _) in self.symlinks.items()} })")


@st.composite
def metas(draw: st.DrawFn, modes: list[int]) -> Meta:
    return Meta(draw(st.sampled_from(modes)), draw(MTIMES), draw(st.sampled_from(OWNERS)),
                draw(st.sampled_from(OWNERS)))


@st.composite
def trees(draw: st.DrawFn, like: Tree | None = None) -> Tree:
    """A random tree; given ``like``, one that reuses its names, content and metadata often,
    so that the second tree is an edit of the first: kept, changed, retyped, removed, new."""
    t = Tree()
    old: dict[str, list[str]] = defaultdict(list)
    if like is not None:
        for p in sorted({*like.dirs, *like.files, *like.links, *like.symlinks}):
            parent, _, name = p.rpartition("/")
            old[parent].append(name)

    def new_path() -> str | None:
        parent = draw(st.sampled_from(["", *sorted(t.dirs)]))
        name = draw(st.sampled_from(old[parent]) if old[parent] and draw(st.booleans())
                    else NAMES)
        path = f"{parent}/{name}" if parent else name
        return None if t.kind(path) else path

    def keep(table: dict[str, Any], path: str) -> bool:
        return path in table and draw(st.integers(0, 3)) > 0

    for _ in range(draw(st.integers(0, 6))):
        if p := new_path():
            t.dirs[p] = like.dirs[p] if like and keep(like.dirs, p) else draw(metas(DIR_MODES))
    for _ in range(draw(st.integers(0, 7))):
        if p := new_path():
            t.files[p] = (like.files[p] if like and keep(like.files, p)
                          else (draw(CONTENT), draw(metas(FILE_MODES))))
    if t.files:
        for _ in range(draw(st.integers(0, 3))):
            if p := new_path():
                t.links[p] = draw(st.sampled_from(sorted(t.files)))
    for _ in range(draw(st.integers(0, 3))):
        if p := new_path():
            if like and keep(like.symlinks, p):
                t.symlinks[p] = like.symlinks[p]
                continue
            existing = sorted([*t.dirs, *t.files])
            target = draw(st.sampled_from(SYMLINK_TARGETS) | NAMES
                          | (st.sampled_from(existing) if existing else NAMES))
            t.symlinks[p] = (target, draw(metas([0o777])))
    return t


def _set_meta(path: str, m: Meta, *, symlink: bool = False) -> None:
    if IS_ROOT:
        os.chown(path, m.uid, m.gid, follow_symlinks=not symlink)
    if not symlink:
        os.chmod(path, m.mode)
    os.utime(path, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=not symlink)


def _meta_differs(path: str, m: Meta) -> bool:
    st_ = os.lstat(path)
    return (stat.S_IMODE(st_.st_mode), st_.st_mtime_ns, st_.st_uid, st_.st_gid) != (
        m.mode, m.mtime_ns, m.uid if IS_ROOT else st_.st_uid, m.gid if IS_ROOT else st_.st_gid)


def _finish_meta(root: Path, t: Tree) -> None:
    """Owners, modes and times, once everything exists: files, symlinks, then dirs bottom-up."""
    for p, (_, m) in t.files.items():
        if _meta_differs(str(root / p), m):
            _set_meta(str(root / p), m)
    for p, (_, m) in t.symlinks.items():
        if _meta_differs(str(root / p), m):
            _set_meta(str(root / p), m, symlink=True)
    for p in sorted(t.dirs, key=lambda p: -p.count("/")):
        if _meta_differs(str(root / p), t.dirs[p]):
            _set_meta(str(root / p), t.dirs[p])


def build(root: Path, t: Tree) -> None:
    """Create ``t`` under the existing directory ``root``."""
    for p in sorted(t.dirs):
        (root / p).mkdir(mode=0o700)
    for p, (content, _) in t.files.items():
        (root / p).write_bytes(content)
    for p, leader in t.links.items():
        os.link(root / leader, root / p)
    for p, (target, _) in t.symlinks.items():
        os.symlink(target, root / p)
    _finish_meta(root, t)


def transform(root: Path, old: Tree, new: Tree, in_place: bool) -> None:
    """Turn the tree ``old`` at ``root`` into ``new`` by the smallest edits a user would make:
    entries of the wrong kind go, files are rewritten (in place or replaced), metadata is set
    only where it differs. Hardlinked files are always replaced, so every strategy agrees on
    what a write to one name of an inode means."""
    relinked = old.linked() | new.linked()
    for p in sorted({*old.dirs, *old.files, *old.links, *old.symlinks}):
        full = root / p
        if not os.path.lexists(full):
            continue  # went with its parent
        was, will = old.kind(p), new.kind(p)
        keep = was == will and (
            was == "dir"
            or (was == "file" and p not in relinked)
            or (was == "symlink" and new.symlinks[p][0] == old.symlinks[p][0]))
        if not keep:
            if was == "dir":
                remove_tree(full)
            else:
                full.unlink()
    for p in sorted(new.dirs):
        if not os.path.lexists(root / p):
            (root / p).mkdir(mode=0o700)
    for p, (content, _) in new.files.items():
        full = root / p
        if not os.path.lexists(full):
            full.write_bytes(content)
        elif full.read_bytes() != content:
            if in_place and (IS_ROOT or os.lstat(full).st_mode & stat.S_IWUSR):
                with open(full, "r+b") as f:
                    f.write(content)
                    f.truncate()
            else:
                full.unlink()
                full.write_bytes(content)
    for p, leader in new.links.items():
        os.link(root / leader, root / p)
    for p, (target, _) in new.symlinks.items():
        if not os.path.lexists(root / p):
            os.symlink(target, root / p)
    _finish_meta(root, new)


@dataclass(frozen=True)
class View:
    entries: dict[str, tuple[Any, ...]]
    groups: frozenset[frozenset[str]]


def describe(root: Path) -> View:
    """Everything the property compares, as seen through lstat/readlink."""
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = defaultdict(list)
    nlinks: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            s = os.lstat(full)
            common = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_mtime_ns, s.st_uid,
                      s.st_gid)
            if stat.S_ISLNK(s.st_mode):
                entries[rel] = (*common, os.readlink(full))
            elif stat.S_ISREG(s.st_mode):
                with open(full, "rb") as f:
                    entries[rel] = (*common, s.st_size, hashlib.sha256(f.read()).hexdigest())
                inodes[(s.st_dev, s.st_ino)].append(rel)
                nlinks[(s.st_dev, s.st_ino)] = s.st_nlink
            else:
                entries[rel] = common
    for key, paths in inodes.items():
        assert nlinks[key] == len(paths), f"{paths} have {nlinks[key]} links, expected {len(paths)}"
    return View(entries, frozenset(frozenset(p) for p in inodes.values() if len(p) > 1))


def untrusted(view: View) -> View:
    """``view`` as a restore without ``trust_owners`` writes it: every entry owned by the user
    restoring, no setuid or setgid bit."""
    me = (os.geteuid(), os.getegid())
    return View({p: (e[0], e[1] & ~0o6000, e[2], *me, *e[5:]) for p, e in view.entries.items()},
                view.groups)


@contextlib.contextmanager
def scratch(factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(dir=factory.getbasetemp()))
    try:
        yield tmp
    finally:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for p in sorted((p for p in points if p.startswith(str(tmp))), reverse=True):
            subprocess.run(["umount", "-l", p], check=False)
        remove_tree(tmp)


SETTINGS = settings(deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@settings(SETTINGS, max_examples=40)
@given(tree=trees())
def test_snapshot_restore_roundtrip(tmp_path_factory: pytest.TempPathFactory, tree: Tree) -> None:
    with scratch(tmp_path_factory) as tmp:
        src, dst = tmp / "src", tmp / "dst"
        src.mkdir()
        dst.mkdir()
        build(src, tree)
        want = describe(src)
        assert len(want.entries) == len({*tree.dirs, *tree.files, *tree.links, *tree.symlinks})
        snap, manifest = snapshot_tree(ObjectStore(LocalBackend(tmp / "store")), str(src))

        # a fresh store sees only what was durably published
        store = ObjectStore(LocalBackend(tmp / "store"))
        loaded = load_manifest(store, snap)
        assert loaded.encode() == manifest.encode()
        assert set(loaded.entries) == set(want.entries)
        restore(store, loaded, str(dst), trust_owners=True)
        assert describe(dst) == want
        assert describe(src) == want  # snapshotting did not touch the source
        again, _ = snapshot_tree(store, str(dst))
        assert again == snap  # same tree, same snapshot id
        mine = tmp / "mine"
        mine.mkdir()
        restore(store, loaded, str(mine))
        assert describe(mine) == untrusted(want)


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(SETTINGS, max_examples=25)
@given(data=st.data(), in_place=st.booleans())
def test_disk_commit_remount_roundtrip(tmp_path_factory: pytest.TempPathFactory, strategy: str,
                                       data: st.DataObject, in_place: bool) -> None:
    a = data.draw(trees(), label="a")
    b = data.draw(trees(like=a), label="b")
    with scratch(tmp_path_factory) as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STICKYCI_STORE", f"file://{tmp / 'store'}")
        mp.setenv("STICKYCI_CACHE_DIR", str(tmp / "cache"))
        ws, ws2 = tmp / "ws", tmp / "ws2"

        assert disks.mount("k", ws, strategy=strategy, trust_owners=True).strategy == strategy
        build(ws, a)
        view_a = describe(ws)
        assert disks.commit(ws).committed  # a new disk is created, even empty
        assert list(ws.iterdir()) == []

        disks.mount("k", ws, strategy=strategy, trust_owners=True)
        assert describe(ws) == view_a
        transform(ws, a, b, in_place)
        view_b = describe(ws)
        r = disks.commit(ws)
        assert r.committed == (view_b != view_a)

        disks.mount("k", ws2, strategy=strategy, trust_owners=True)
        assert describe(ws2) == view_b
        disks.unmount(ws2)
        disks.mount("k", ws2, strategy=strategy)
        assert describe(ws2) == untrusted(view_b)
        disks.unmount(ws2)

        # what the store holds, without this machine's base cache
        ref = refs.read_ref(LocalBackend(tmp / "store"), "k")
        assert ref is not None and ref.latest is not None
        store = ObjectStore(LocalBackend(tmp / "store"))
        out = tmp / "restored"
        out.mkdir()
        restore(store, load_manifest(store, ref.latest.snapshot), str(out), trust_owners=True)
        assert describe(out) == view_b


# --- bugs the properties found (fixed since), pinned as examples ------------------------------

@pytest.mark.root
@pytest.mark.parametrize("replacement", ["file", "symlink"])
def test_overlay_commit_of_dir_replaced_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               replacement: str) -> None:
    """A lower dir replaced by a non-dir leaves no whiteouts for its children in the upper
    layer; they must still leave the manifest, or the snapshot cannot be restored."""
    monkeypatch.setenv("STICKYCI_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    try:
        disks.mount("k", ws, strategy="overlay")
        (ws / "x").mkdir()
        (ws / "x" / "a").write_text("a")
        disks.commit(ws)
        disks.mount("k", ws, strategy="overlay")
        remove_tree(ws / "x")
        if replacement == "file":
            (ws / "x").write_text("now a file")
        else:
            os.symlink("/tmp", ws / "x")
        view = describe(ws)
        disks.commit(ws)
        disks.mount("k", tmp_path / "ws2", strategy="copy")
        assert describe(tmp_path / "ws2") == view
        disks.unmount(tmp_path / "ws2")
    finally:
        for p in (ws, tmp_path / "ws2"):
            if os.path.ismount(p):
                subprocess.run(["umount", "-l", str(p)], check=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_on_change_sees_a_hardlink_only_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              strategy: str) -> None:
    """Linking two equal files changes no bytes, modes or times, but it is a change."""
    monkeypatch.setenv("STICKYCI_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    try:
        disks.mount("k", ws, strategy=strategy)
        for n in ("p", "q"):
            (ws / n).write_text("same")
            os.utime(ws / n, ns=(10**18, 10**18))
        os.utime(ws, ns=(10**18, 10**18))
        disks.commit(ws)
        disks.mount("k", ws, strategy=strategy)
        (ws / "q").unlink()
        os.link(ws / "p", ws / "q")  # same bytes, mode and mtime: only the inode is shared now
        view = describe(ws)
        assert view.groups == {frozenset({"p", "q"})}
        assert disks.commit(ws).committed
        disks.mount("k", tmp_path / "ws2", strategy=strategy)
        assert describe(tmp_path / "ws2") == view
        disks.unmount(tmp_path / "ws2")
    finally:
        for p in (ws, tmp_path / "ws2"):
            if os.path.ismount(p):
                subprocess.run(["umount", "-l", str(p)], check=False)


def test_non_utf8_file_name(tmp_path: Path) -> None:
    """Linux names are bytes; one that is not UTF-8 must survive a snapshot byte for byte."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    name = os.fsdecode(b"caf\xe9-latin1.txt")
    (src / name).write_bytes(b"x")
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    snap, _ = snapshot_tree(store, str(src))
    restore(store, load_manifest(store, snap), str(dst))
    assert os.listdir(os.fsencode(dst)) == [b"caf\xe9-latin1.txt"]


def test_non_utf8_file_name_through_the_cli(tmp_path: Path) -> None:
    """Committed, or refused in one line: never a traceback."""
    env = {**os.environ, "STICKYCI_STORE": f"file://{tmp_path / 'store'}",
           "STICKYCI_CACHE_DIR": str(tmp_path / "cache")}
    ws = tmp_path / "ws"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stickyci", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    assert cli("disk", "mount", "k", str(ws), "--strategy", "copy").returncode == 0
    (ws / os.fsdecode(b"\xff")).write_bytes(b"x")
    proc = cli("disk", "commit", str(ws))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 or len(proc.stderr.strip().splitlines()) == 1
