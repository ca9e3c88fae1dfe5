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
from stickyci.snapshot import Entry, Manifest, load_manifest, save_manifest, validate
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

    # As an overlay commit does it: the base read lazily, the new tree that base patched.
    lazy = Manifest.decode(_tree().encode(), lazy=True)
    patched = Manifest.patched(lazy, {**dict.fromkeys(drop), **{e.path: e for e in put}})
    assert (patched.files, patched.size) == (new.files, new.size)
    assert patched.encode_after(lazy, touched) == new.encode()
    assert patched == new


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
    with pytest.raises(IntegrityError, match="format 4"):
        Manifest.decode(b'[{"format":4}\n]')


def test_format_3_is_one_entry_per_line() -> None:
    """Each entry on a line of its own, exactly as ``orjson`` writes it alone (what a splice
    puts in), hardlink groups numbered in path order; an empty tree is the header alone."""
    m = _tree()
    lines = m.encode().split(b"\n")
    rows = [e.to_row() for e in m.sorted_entries()]
    for row in rows:
        row[9] = 1 if row[9] else 0
    head = b'[{"format":3,"files":9,"size":24}'  # two of the files share their 3 bytes
    assert lines == [head, *(b"," + orjson.dumps(r) for r in rows), b"]"]
    assert Manifest().encode() == b'[{"format":3,"files":0,"size":0}\n]'
    assert Manifest.decode(Manifest().encode()) == Manifest()


def test_a_format_2_manifest_reads_and_a_commit_splices_it_into_format_3() -> None:
    """Format 2 (before bundles) has format 3's lines: read lazily or whole, it is the same
    tree, and a commit on it splices its lines under a format 3 header."""
    m = _tree()
    old = m.encode().replace(b'"format":3', b'"format":2', 1)
    lazy = Manifest.decode(old, lazy=True)
    assert lazy.get("z/f") == m.entries["z/f"] and (lazy.files, lazy.size) == (9, 24)
    assert lazy == Manifest.decode(old) == Manifest.decode(m.encode())
    bundled = Entry("z/new", "file", 0o644, 1, size=3, chunks=[["ab" * 32, 3, 7]])
    new, touched = _changed(lazy, ["z/g"], [bundled])
    assert new.encode_after(lazy, touched) == new.encode()
    assert new.encode().startswith(b'[{"format":3,')
    assert Manifest.decode(new.encode(), lazy=True).get("z/new") == bundled


def _with_line(data: bytes, path: str, line: bytes) -> bytes:
    """``data`` with the entry line of ``path`` replaced by ``line``."""
    lines = data.split(b"\n")
    at = next(i for i, x in enumerate(lines) if x.startswith(b',["' + path.encode() + b'",'))
    return b"\n".join([*lines[:at], line, *lines[at + 1:]])


def test_a_lazy_manifest_reads_only_the_lines_it_is_asked_about() -> None:
    """What makes it cheap, shown by a damaged line elsewhere: lookups, the paths under a
    directory and the totals come from the lines asked about and the header; asking for
    every entry reads the damaged line, and says so."""
    tree = _tree()
    data = _with_line(tree.encode(), "a/b-x", b',["a/b-x","file",420,"garbage"]')
    lazy = Manifest.decode(data, "snapshot X", lazy=True)
    assert lazy.get("z/f") == tree.entries["z/f"]
    assert lazy.get("z/nothing") is None and lazy.get("0") is None and lazy.get("zz") is None
    assert lazy.under({"a/b", "z"}) == {"a/b/f", "a/b/g", "z/f", "z/g", "z/h2", "z/l"}
    assert (lazy.files, lazy.size) == (9, 24)
    with pytest.raises(IntegrityError, match="snapshot X is not a valid manifest"):
        lazy.get("a/b-x")
    with pytest.raises(IntegrityError, match="snapshot X is not a valid manifest"):
        _ = lazy.entries


def test_a_lazy_manifest_is_the_eager_one() -> None:
    """Every path, every directory's contents and the totals agree, names with escapes
    (quotes, backslashes, control characters, non-ASCII) included."""
    tree = _tree()
    for name in ('a/q"uote', "a/back\\slash", "a/tab\tname", "a/é", "a/\u2603", 'a/x","y'):
        tree.entries[name] = Entry(name, "file", 0o644, 1, size=2, chunks=[["cd" * 32, 2]])
    data = tree.encode()
    lazy, eager = Manifest.decode(data, lazy=True), Manifest.decode(data)
    for path in [*eager.entries, "a/b/", "a/q", "a/é/x", "zzz", "", f"a/{SURROGATE}"]:
        assert lazy.get(path) == eager.entries.get(path), path
    roots = {p for p, e in eager.entries.items() if e.kind == "dir"}
    assert lazy.under(roots) == eager.under(roots)
    assert (lazy.files, lazy.size) == (eager.files, eager.size) == (15, 36)
    assert lazy == eager


def test_totals_of_a_patched_manifest_follow_its_changes() -> None:
    """Counted from the base's totals (its header's, when read lazily) and the changes
    alone, hardlinks counted once: a change to a linked path counts the whole tree."""
    added = Entry("z/new", "file", 0o644, 1, size=10, chunks=[["cd" * 32, 10]])
    for lazy in (True, False):
        base = Manifest.decode(_tree().encode(), lazy=lazy)
        for changes in ({"z/f": None, "z/new": added}, {"a/b": None, "a/b/f": None,
                        "a/b/g": None}, {"z/h2": None}, {"a/ba/h1": added}):
            patched = Manifest.patched(base, changes)  # type: ignore[arg-type]
            totals = patched.totals  # before anything parses every entry
            whole = Manifest(dict(patched.entries))
            assert totals == (whole.files, whole.size), (lazy, changes)
    assert Manifest.patched(Manifest(), {"z/new": added}).totals == (1, 10)


def test_a_manifest_whose_header_lies_about_its_totals_is_refused() -> None:
    """The totals are read as a commit's counts, so a restore checks them like any field."""
    data = _tree().encode().replace(b'"files":9', b'"files":90', 1)
    m = Manifest.decode(data, "snapshot Y")
    with pytest.raises(IntegrityError, match="snapshot Y: its header states 90 files"):
        validate(m)
    validate(Manifest.decode(_tree().encode()))


def test_reading_lazily_accepts_what_reading_whole_accepts() -> None:
    """Lazy reading is a shortcut, not a stricter reader: a header it cannot use (another
    key, totals that are not counts) is parsed whole, as without it."""
    data = _tree().encode()
    for head in (b'[{"format":3,"files":9,"size":24,"note":"x"}',
                 b'[{"format":3,"files":"9","size":24}'):
        other = data.replace(b'[{"format":3,"files":9,"size":24}', head, 1)
        assert Manifest.decode(other, lazy=True) == Manifest.decode(other)


def test_a_format_2_manifest_without_totals_reads_whole() -> None:
    """Written before the header stated them (89411f9 to bb85d6f): read as it always was,
    lazily too, and a commit on it encodes its manifest whole."""
    m = _tree()
    old = m.encode().replace(b'[{"format":3,"files":9,"size":24}', b'[{"format":2}', 1)
    lazy = Manifest.decode(old, lazy=True)
    assert lazy == Manifest.decode(m.encode()) and (lazy.files, lazy.size) == (9, 24)
    new, touched = _changed(lazy, ["z/g"], [])
    assert new.encode_after(lazy, touched) == new.encode()
