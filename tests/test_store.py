"""The object store: envelopes, packs, integrity on read, atomic local writes, CAS refs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import scratch_mount, tmpfs

from stickyci import codec
from stickyci.digest import Digest
from stickyci.errors import IntegrityError, NotFound, StorageFull, UsageError
from stickyci.store import LocalBackend, ObjectStore, open_backend
from stickyci.store.local import DIRECT_MIN
from stickyci.store.objects import PACK_TARGET, decode_index
from stickyci.store.tier import TieredBackend


def test_roundtrip_through_a_pack(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path))
    blobs = [os.urandom(100), b"a" * 100_000, b""]
    digests = [store.put(b) for b in blobs]
    store.flush()
    again = ObjectStore(LocalBackend(tmp_path))
    assert [again.get(d) for d in digests] == blobs
    assert len(LocalBackend(tmp_path).list("packs")) == 1


def test_full_packs_are_written_behind_and_all_are_there_after_flush(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path), local_index=False)
    blobs = [os.urandom(1 << 20) for _ in range(3 * PACK_TARGET // (1 << 20) + 1)]
    digests = [store.put(b) for b in blobs]
    store.flush()
    assert len(LocalBackend(tmp_path).list("packs")) == 4
    again = ObjectStore(LocalBackend(tmp_path), local_index=False)
    assert [again.get(d) for d in digests] == blobs


@pytest.mark.root
def test_a_pack_written_behind_that_fails_fails_the_flush(tmp_path: Path) -> None:
    # The full pack is written on a thread while the next one fills: its failure (a full
    # disk, for real) must reach the caller, and none of its objects count as stored; the
    # object after it is still to be written, by the next flush.
    with tmpfs(tmp_path, "8m"):
        store = ObjectStore(LocalBackend(tmp_path), local_index=False)
        blobs = [os.urandom(1 << 20) for _ in range(PACK_TARGET // (1 << 20) + 1)]
        digests = [store.put(b) for b in blobs]
        with pytest.raises(StorageFull):
            store.flush()
        assert not any(store.has(d) for d in digests[:-1])
        assert LocalBackend(tmp_path).list("packs") == []
        assert os.listdir(tmp_path / "tmp") == []
        store.flush()
        again = ObjectStore(LocalBackend(tmp_path), local_index=False)
        assert again.get(digests[-1]) == blobs[-1]
        assert len(LocalBackend(tmp_path).list("packs")) == 1


def _cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "pages", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_packs_bypass_the_page_cache_and_read_back_whole(tmp_path: Path) -> None:
    # A size that is no multiple of the block size: the padding the direct write needs must
    # not stay in the blob.
    data = os.urandom(DIRECT_MIN + 12_345)
    store = LocalBackend(tmp_path / "store")
    store.put("packs/big", data)
    store.put("packs/kept", data, cached=True)
    store.put("packs/small", data[:1000])
    packs = tmp_path / "store" / "packs"
    assert (packs / "big").stat().st_size == len(data)
    assert _cached_pages(packs / "big") == 0
    assert _cached_pages(packs / "kept") > 0
    assert _cached_pages(packs / "small") > 0  # small blobs as before
    assert store.get("packs/big") == store.get("packs/kept") == data
    assert store.get("packs/small") == data[:1000]
    assert os.listdir(tmp_path / "store" / "tmp") == []


def test_the_tier_caches_what_it_fetches_and_not_what_it_committed(tmp_path: Path) -> None:
    # What a runner commits is read back later if at all; of a pack it fetched on a miss, the
    # rest is read next.
    remote = LocalBackend(tmp_path / "remote")
    tier = TieredBackend(LocalBackend(tmp_path / "tier"), remote, 1 << 30)
    committed, fetched = os.urandom(DIRECT_MIN + 1), os.urandom(DIRECT_MIN + 2)
    ours, theirs = (f"packs/{Digest.of(d).hex}" for d in (committed, fetched))
    tier.put(ours, committed)
    remote.put(theirs, fetched)
    assert tier.get(theirs, 10, 5) == fetched[10:15]
    local = tmp_path / "tier"
    assert _cached_pages(local / ours) == 0
    assert _cached_pages(local / theirs) > 0
    assert (local / ours).read_bytes() == remote.get(ours) == committed
    assert (local / theirs).read_bytes() == fetched


@pytest.mark.root
def test_a_filesystem_without_direct_io_gets_buffered_writes(tmp_path: Path) -> None:
    # ramfs refuses O_DIRECT (EINVAL), as some network and FUSE filesystems do.
    with scratch_mount(tmp_path / "ram", "ramfs"):
        store = ObjectStore(LocalBackend(tmp_path / "ram"), local_index=False)
        blobs = [os.urandom(1 << 20) for _ in range(PACK_TARGET // (1 << 20) + 2)]
        digests = [store.put(b) for b in blobs]
        store.flush()
        again = ObjectStore(LocalBackend(tmp_path / "ram"), local_index=False)
        assert [again.get(d) for d in digests] == blobs
        assert os.listdir(tmp_path / "ram" / "tmp") == []


def test_duplicate_put_stores_once(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path))
    store.put(b"same")
    store.put(b"same")
    store.flush()
    assert store.objects_written == 1
    store2 = ObjectStore(LocalBackend(tmp_path))
    store2.put(b"same")
    store2.flush()
    assert store2.objects_written == 0


def test_compressible_data_is_compressed_and_random_is_not() -> None:
    assert len(codec.encode(b"x" * 10_000)) < 100
    noise = os.urandom(10_000)
    assert len(codec.encode(noise)) == len(noise) + codec.HEADER_SIZE


def test_corrupt_object_is_detected_on_read(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path))
    d = store.put(os.urandom(5000))
    store.flush()
    (pack,) = (tmp_path / "packs").iterdir()
    os.chmod(pack, 0o644)
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0xFF
    pack.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=str(d)):
        ObjectStore(LocalBackend(tmp_path)).get(d)


def test_damaged_index_is_detected(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path))
    store.put(b"hello")
    store.flush()
    (index,) = (tmp_path / "index").iterdir()
    data = bytearray(index.read_bytes())
    data[5] ^= 1
    with pytest.raises(IntegrityError, match="pack index"):
        decode_index("index/x", bytes(data))


def test_missing_object_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ObjectStore(LocalBackend(tmp_path)).get(Digest.of(b"never stored"))


def test_put_leaves_no_temp_files_and_is_read_only(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.put("packs/abc", b"data")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert (tmp_path / "packs" / "abc").stat().st_mode & 0o222 == 0
    assert b.get("packs/abc", 1, 2) == b"at"


def test_compare_and_swap(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    assert b.put_if("refs/k", b"one", None)
    assert not b.put_if("refs/k", b"two", None)
    got = b.read_versioned("refs/k")
    assert got is not None
    assert not b.put_if("refs/k", b"two", "stale-etag")
    assert b.put_if("refs/k", b"two", got[1])
    assert b.get("refs/k") == b"two"


@pytest.mark.parametrize("name", ["../x", "refs/../../etc", "/abs", "refs/", "refs/a/b", "x"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        LocalBackend(tmp_path).put(name, b"")


def test_store_url_schemes(tmp_path: Path) -> None:
    assert open_backend(f"file://{tmp_path}").url == f"file://{tmp_path}"
    with pytest.raises(UsageError, match="unsupported scheme"):
        open_backend("ftp://host/x")
