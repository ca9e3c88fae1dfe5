"""The manifest as a commit stores it: the collector is held off only while a manifest is built
or parsed, and a manifest stored at its own zstd level reads back as any object does."""

from __future__ import annotations

import gc
from pathlib import Path

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
