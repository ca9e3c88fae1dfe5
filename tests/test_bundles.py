"""Small files are stored in bundles: several files' bytes concatenated into one object, each
file's entry naming its slice (``[digest, length, offset]``). A tree restores exactly; the
same files make the same bundles, so a second tree deduplicates against the first; a file
added in the middle of a run moves no other bundle; and a slice that does not fit its bundle
is refused, never written short."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers import tmpfs

from stickyci.digest import Digest
from stickyci.errors import IntegrityError
from stickyci.snapshot import (
    FILE,
    Content,
    ContentFill,
    Entry,
    Manifest,
    build,
    load_manifest,
    restore,
    scan_tree,
    snapshot_tree,
)
from stickyci.snapshot.model import validate
from stickyci.store import LocalBackend, ObjectStore

KiB = 1 << 10


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _files(seed: int, n: int) -> dict[str, bytes]:
    """``n`` small files of 1 B to 64 KiB, half of them text-like (they compress)."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        size = rng.randrange(1, build.SMALL_FILE + 1)
        if i % 2:
            data = (b"fn item_%d() -> u32 { %d }\n" % (i, i) * (size // 20 + 1))[:size]
        else:
            data = rng.randbytes(size)
        out[f"src/m{i // 50}/f{i:04}.rs"] = data
    return out


def _slices(m: Manifest) -> dict[str, list[object]]:
    return {e.path: e.chunks[0] for e in m.entries.values()
            if e.kind == FILE and e.chunks and len(e.chunks[0]) == 3}


@pytest.fixture(params=[False, True], ids=["here", "forked"])
def parallel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Fill in this process, or in forked workers over small batches (bundles end at a
    batch's end: a worker has only its own files)."""
    if request.param:
        monkeypatch.setattr(build, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(build, "_BATCH_BYTES", 2 << 20)
    return bool(request.param)


def test_small_files_share_bundles_and_restore_exactly(tmp_path: Path, parallel: bool) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    files = _files(1, 400)
    files["empty"] = b""
    files["big"] = random.Random(2).randbytes(300 * KiB)  # chunks of its own
    files["just-over"] = b"x" * (build.SMALL_FILE + 1)
    _write(src, files)
    os.link(src / "src/m0/f0001.rs", src / "linked.rs")
    files["linked.rs"] = files["src/m0/f0001.rs"]
    store = ObjectStore(LocalBackend(tmp_path / "store"))

    snap, m = snapshot_tree(store, str(src))

    slices = _slices(m)
    bundles = {ref[0] for ref in slices.values()}
    # every small file but the odd one left alone at a bundle's end is a slice
    assert len(slices) >= 400 - len(bundles)
    assert 1 < len(bundles) < 400 // 4
    for rel in ("empty", "big", "just-over"):
        assert all(len(ref) == 2 for ref in m.entries[rel].chunks)
    # a bundle's slices tile it, from 0 (a hardlink's entry names its group's slice)
    sizes = []
    for b in bundles:
        parts = sorted({(ref[2], ref[1]) for ref in slices.values() if ref[0] == b})
        assert [off for off, _ in parts] == [sum(n for _, n in parts[:i])
                                             for i in range(len(parts))]
        sizes.append(sum(n for _, n in parts))
    # of the size bounds, only the last of a run of files (all of them here, a worker's
    # batch forked) may fall short
    assert all(n < build.BUNDLE_MAX + build.SMALL_FILE for n in sizes)
    assert sum(n < build.BUNDLE_MIN for n in sizes) <= (len(sizes) // 2 if parallel else 1)

    restore(ObjectStore(LocalBackend(tmp_path / "store")), load_manifest(store, snap), str(dst))
    assert {rel: (dst / rel).read_bytes() for rel in files} == files
    assert (dst / "linked.rs").stat().st_ino == (dst / "src/m0/f0001.rs").stat().st_ino


def test_the_same_files_make_the_same_bundles(tmp_path: Path, parallel: bool) -> None:
    """A second tree of the same files stores no content, however its filesystem lists
    them (tmpfs: newest first; ext4: by a hash of the name, seeded per filesystem)."""
    files = _files(3, 600)
    a = tmp_path / "a"
    _write(a, files)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    _, ma = snapshot_tree(store, str(a))
    written = store.objects_written
    with tmpfs(tmp_path / "elsewhere", "64m") as elsewhere:
        b = elsewhere / "b"
        _write(b, files)
        assert os.listdir(b / "src/m0") != os.listdir(a / "src/m0")  # listed in another order
        _, mb = snapshot_tree(store, str(b))
    assert store.objects_written == written + 1  # its manifest (other mtimes), no content
    assert _slices(ma) == _slices(mb)


def test_a_file_added_in_the_middle_stores_about_one_bundle_again(tmp_path: Path,
                                                                  parallel: bool) -> None:
    """Not every bundle after the new file: bundles end where names say, not where sizes
    add up."""
    files = _files(3, 600)
    a, c = tmp_path / "a", tmp_path / "c"
    _write(a, files)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    _, ma = snapshot_tree(store, str(a))
    files_c = dict(files)
    files_c["src/m5/f0250-new.rs"] = b"a new file\n" * 300
    _write(c, files_c)
    _, mc = snapshot_tree(store, str(c))
    old, new = ({ref[0] for ref in _slices(m).values()} for m in (ma, mc))
    assert len(new - old) <= (2 if not parallel else 4)
    assert len(new & old) >= len(old) - (2 if not parallel else 4)


def test_a_small_file_read_again_unchanged_keeps_its_slice(tmp_path: Path,
                                                           parallel: bool) -> None:
    """A commit compares a small file it reads with its base's: unchanged (copied up, or
    rewritten with the same bytes) it keeps its slice, where a new bundle would store it
    again and call it modified."""
    files = _files(5, 200)
    src = tmp_path / "src"
    _write(src, files)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    snap, _ = snapshot_tree(store, str(src))
    base = load_manifest(store, snap, lazy=True)
    changed = "src/m2/f0120.rs"
    (src / "src/m1/f0060.rs").write_bytes(files["src/m1/f0060.rs"])
    (src / changed).write_bytes(files[changed] + b"!")
    written = store.objects_written
    with ContentFill(store, base) as fill:
        new = scan_tree(str(src), fill=fill).manifest  # every file read again
        fill.finish()
    assert [p for p in files if new.entries[p].chunks != base.get(p).chunks] == [changed]
    assert store.objects_written == written + 1  # the changed file, a bundle of its own
    assert len(new.entries[changed].chunks[0]) == 2


def test_bundles_store_less_than_files_one_by_one(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What bundling is for: files that share their lines (sources, headers) compress
    together, where one by one each holds too few of them to repeat."""
    rng = random.Random(4)
    lines = [rng.randbytes(30).hex().encode() + b"\n" for _ in range(400)]
    files = {f"f{i:03}": b"".join(rng.choices(lines, k=40)) for i in range(300)}
    src = tmp_path / "src"
    _write(src, files)
    bundled = ObjectStore(LocalBackend(tmp_path / "bundled"))
    snapshot_tree(bundled, str(src))
    monkeypatch.setattr(build, "SMALL_FILE", 0)
    alone = ObjectStore(LocalBackend(tmp_path / "alone"))
    snapshot_tree(alone, str(src))
    assert bundled.bytes_written < 0.9 * alone.bytes_written
    assert bundled.objects_written < alone.objects_written // 10


@pytest.mark.parametrize("bad, why", [
    (lambda ref: [ref[0], ref[1], ref[2] + 1 << 20], "holds"),   # past the bundle's end
    (lambda ref: [ref[0], ref[1] + 1, ref[2]], "holds"),          # runs past it (and size)
    (lambda ref: [ref[0], ref[1]], "holds"),                      # the whole bundle, shorter
])
def test_a_slice_that_does_not_fit_its_bundle_is_refused(tmp_path: Path, bad: object,
                                                         why: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    files = {"a": b"first file\n" * 100, "b": b"second file\n" * 100}
    _write(src, files)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    _, m = snapshot_tree(store, str(src))
    last = max(_slices(m), key=lambda p: _slices(m)[p][2])
    assert callable(bad)
    m.entries[last].chunks = [bad(m.entries[last].chunks[0])]
    m.entries[last].size = m.entries[last].chunks[0][1]
    with pytest.raises(IntegrityError, match=f"{why}.*{last}"):
        restore(store, m, str(dst))


@pytest.mark.parametrize("ref", [
    ["0" * 64, 5, -1], ["0" * 64, 5, "0"], ["0" * 64, 5, True], ["0" * 64, 5, 0, 0],
    ["0" * 64, 5, 2**63],
])
def test_a_malformed_slice_reference_is_refused(ref: list[object]) -> None:
    m = Manifest.decode(b'[{"format":3,"files":1,"size":5}\n,["f","file",420,0,0,0,5,[' +
                        str(ref).replace("'", '"').replace("True", "true").encode() +
                        b'],"",0]\n]')
    with pytest.raises(IntegrityError, match="chunk reference"):
        validate(m)


@pytest.mark.parametrize("ref", [
    ["zz" * 32, 5], ["ab" * 31, 5], ["ab" * 32, -1], ["ab" * 32, 5, -1], ["ab" * 32, 5, "0"],
    ["ab" * 32, "5"], ["ab" * 32, 5, 0, 0], [7, 5], "ab" * 32,
])
def test_what_is_no_reference_is_refused_before_anything_is_read(tmp_path: Path,
                                                                  ref: object) -> None:
    """Content is read from manifests a commit extends without validating them: a value
    that is no reference is an IntegrityError naming the file, not a crash or a wrong
    slice (a negative offset would count from the end)."""
    content = Content(ObjectStore(LocalBackend(tmp_path / "store")))
    with pytest.raises(IntegrityError, match="content of f"):
        content.read(ref, "f")  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="content of f"):
        content.holds(ref, b"12345", "f")  # type: ignore[arg-type]


def test_a_base_entry_that_cannot_be_read_only_means_storing_the_file_anew(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, {"f": b"12345", "g": b"67890"})
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    base = Manifest({p: Entry(p, FILE, 0o644, 0, size=5, chunks=[chunks]) for p, chunks in (
        ("f", ["ab" * 32, 5, -1]),            # no reference
        ("g", [Digest.of(b"x").hex, 5, 0]))})  # an object the store does not have
    with ContentFill(store, base) as fill:
        new = scan_tree(str(src), fill=fill).manifest
        fill.finish()
    bundle = new.entries["f"].chunks[0][0]
    assert new.entries["f"].chunks == [[bundle, 5, 0]] and new.entries["g"].chunks == [
        [bundle, 5, 5]]
    assert bytes(Content(store).read(new.entries["g"].chunks[0], "g")) == b"67890"
