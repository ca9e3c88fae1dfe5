"""The manifest as a commit stores it: the collector is held off only while a manifest is built
or parsed, and a manifest stored at its own zstd level reads back as any object does."""

from __future__ import annotations

import base64
import gc
import os
from pathlib import Path

import orjson
import pytest

from stickyci import codec
from stickyci.errors import IntegrityError
from stickyci.snapshot import Entry, Manifest, load_manifest, save_manifest
from stickyci.store import LocalBackend, ObjectStore


def manifest(n: int) -> Manifest:
    entries = {"d": Entry("d", "dir", 0o755, 1)}
    for i in range(n):
        path = f"d/f{i:05}"
        entries[path] = Entry(path, "file", 0o644, 2, size=3, chunks=[["ab" * 32, 3]])
    return Manifest(entries)


def test_the_collector_is_back_as_it_was_after_encode_and_decode() -> None:
    m = manifest(2000)
    assert gc.isenabled()
    assert Manifest.decode(m.encode()) == m
    assert gc.isenabled()
    with pytest.raises(IntegrityError, match="not a valid manifest"):
        Manifest.decode(b'{"format": 1, "entries": [["short"]]}')
    assert gc.isenabled()  # an error on the way out restores it too

    gc.disable()
    try:
        Manifest.decode(m.encode())
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_a_saved_manifest_reads_back_and_is_compressed(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    m = manifest(3000)
    snapshot = save_manifest(store, m)
    loc = store.locate(snapshot)
    assert loc is not None and loc.length < len(m.encode()) // 2
    envelope = (tmp_path / "store" / loc.pack).read_bytes()[loc.offset:loc.offset + loc.length]
    assert envelope[4] == codec.ZSTD
    assert load_manifest(ObjectStore(LocalBackend(tmp_path / "store")), snapshot) == m
    assert save_manifest(store, m) == snapshot  # stored once


def _tree() -> Manifest:
    rows: dict[str, Entry] = {}
    for d in ("a", "a/b", "a/b.c", "a/ba", "z"):
        rows[d] = Entry(d, "dir", 0o755, 1)
    for i, path in enumerate(("a/b/f", "a/b/g", "a/b.c/f", "a/b-x", "a/ba/f", "z/f", "z/g")):
        rows[path] = Entry(path, "file", 0o644, i, size=3, chunks=[[f"{i:02x}" * 32, 3]])
    rows["z/l"] = Entry("z/l", "symlink", 0o777, 9, target="../a")
    for path in ("a/ba/h1", "z/h2"):
        rows[path] = Entry(path, "file", 0o644, 5, size=3, chunks=[["ee" * 32, 3]], link=7)
    return Manifest(rows)


def _changed(base: Manifest, drop: list[str], put: list[Entry]) -> tuple[Manifest, set[str]]:
    """``base`` as an overlay commit extends it: entries dropped and put, the rest shared."""
    new = Manifest(dict(base.entries))
    for p in drop:
        del new.entries[p]
    new.entries.update({e.path: e for e in put})
    return new, {*drop, *(e.path for e in put)}


SURROGATE = b"n\xffme".decode(errors="surrogateescape")  # a name that is not UTF-8


@pytest.mark.parametrize("drop, put", [
    ([], []),
    (["a/b", "a/b/f", "a/b/g"], []),  # a deleted directory, between "a/b-x" and "a/b.c"
    (["z/g"], [Entry("a/b.d", "file", 0o600, 3, size=1, chunks=[["cd" * 32, 1]])]),
    ([], [Entry("0first", "dir", 0o700, 4), Entry("zz", "dir", 0o700, 4)]),  # both ends
    ([], [Entry("z/f", "file", 0o755, 8, size=3, chunks=[["ff" * 32, 3]])]),  # in place
    ([], [Entry("z/h2", "file", 0o644, 6, size=1, chunks=[["dd" * 32, 1]])]),  # was linked
    ([], [Entry(f"z/{SURROGATE}", "file", 0o644, 1, size=1, chunks=[["dd" * 32, 1]])]),
], ids=["nothing", "dir-removed", "added-removed", "ends", "modified", "unlinked", "not-utf8"])
def test_a_manifest_spliced_into_its_base_is_the_one_encoded_whole(
        drop: list[str], put: list[Entry]) -> None:
    base = Manifest.decode(_tree().encode())
    new, touched = _changed(base, drop, put)
    assert new.encode_after(base, touched) == new.encode()
    assert Manifest.decode(new.encode_after(base, touched)) == new


def test_the_splice_copies_untouched_entries_from_the_base_bytes() -> None:
    """What makes the splice cheap: an untouched entry is not encoded again but taken as the
    base's bytes have it (here the entry in memory was changed behind the commit's back, which
    no strategy does); a base without those bytes is encoded whole."""
    base = Manifest.decode(_tree().encode())
    new, touched = _changed(base, [], [Entry("z/new", "dir", 0o700, 4)])
    base.entries["a/b/f"].mode = 0o600
    spliced = Manifest.decode(new.encode_after(base, touched))
    assert spliced.entries["a/b/f"].mode == 0o644 and "z/new" in spliced.entries
    whole = Manifest(base.entries)  # built in memory, not read from the store
    assert Manifest.decode(new.encode_after(whole, touched)).entries["a/b/f"].mode == 0o600


def test_format_1_manifests_still_read() -> None:
    """Stores written before format 2 (one JSON object, escaped names flagged for the whole
    document) read as they always did."""
    m = _tree()
    m.entries[SURROGATE] = Entry(SURROGATE, "dir", 0o755, 1)
    rows = [e.to_row() for e in m.sorted_entries()]
    for row in rows:
        row[9] = 1 if row[9] else 0
    plain = {"format": 1, "entries": [r for r in rows if r[0] != SURROGATE]}
    assert Manifest.decode(orjson.dumps(plain)).entries.keys() == m.entries.keys() - {SURROGATE}
    escaped = {"format": 1, "escaped": True, "entries": [
        [{"raw": base64.b64encode(os.fsencode(r[0])).decode()}, *r[1:]] for r in rows]}
    assert Manifest.decode(orjson.dumps(escaped)).entries.keys() == m.entries.keys()
    with pytest.raises(IntegrityError, match="format 3"):
        Manifest.decode(b'[{"format":3}\n]')


def test_format_2_is_one_entry_per_line() -> None:
    """Each entry on a line of its own, exactly as ``orjson`` writes it alone (what a splice
    puts in), hardlink groups numbered in path order; an empty tree is the header alone."""
    m = _tree()
    lines = m.encode().split(b"\n")
    rows = [e.to_row() for e in m.sorted_entries()]
    for row in rows:
        row[9] = 1 if row[9] else 0
    assert lines == [b'[{"format":2}', *(b"," + orjson.dumps(r) for r in rows), b"]"]
    assert Manifest().encode() == b'[{"format":2}\n]'
    assert Manifest.decode(Manifest().encode()) == Manifest()
