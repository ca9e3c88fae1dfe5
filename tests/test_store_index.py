"""The local merged index (``stickyci.store.localindex``): a refresh reads only what changed,
stays right when other machines commit and after a gc, and never trusts its file blindly.

"Machines" here are cache directories (``STICKYCI_CACHE_DIR``), which is where a runner keeps
its local index; every store is a real ``file://`` store, every gc the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import Env
from test_http_inprocess import InProcess, disk_ref, served  # noqa: F401 (a fixture)

from stickyci import disks
from stickyci.digest import Digest
from stickyci.disks import gc, refs
from stickyci.errors import NotFound
from stickyci.snapshot import Entry, Manifest, save_manifest
from stickyci.snapshot.model import FILE
from stickyci.store import LocalBackend, ObjectStore, Stat, localindex
from stickyci.store.localindex import LocalIndex, encode_add


class Counted(LocalBackend):
    """A ``file://`` store that counts the calls made to it, by method and namespace."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: Counter[str] = Counter()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Count, then read."""
        self.calls[f"get {name.split('/')[0]}"] += 1
        return super().get(name, offset, length)

    def stat(self, name: str) -> Stat | None:
        """Count, then stat."""
        self.calls[f"stat {name.split('/')[0]}"] += 1
        return super().stat(name)

    def list(self, namespace: str) -> list[str]:
        """Count, then list."""
        self.calls[f"list {namespace}"] += 1
        return super().list(namespace)


def on_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Switch to the runner ``name``: its own cache directory, so its own local index."""
    cache = tmp_path / f"machine-{name}"
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(cache))
    return cache


def commit(store: ObjectStore, backend: LocalBackend, key: str, *contents: bytes) -> Digest:
    """A snapshot of files with ``contents`` stored as disk ``key`` (one pack)."""
    entries = {f"f{i}": Entry(f"f{i}", FILE, 0o644, 0, size=len(c),
                              chunks=[[store.put(c).hex, len(c)]])
               for i, c in enumerate(contents)}
    snap = save_manifest(store, Manifest(entries))
    current = backend.read_versioned(f"refs/{key}")
    assert backend.put_if(f"refs/{key}", disk_ref(key, snap), current[1] if current else None)
    return snap


def index_file(cache: Path) -> Path:
    """The one local index file under a machine's cache directory."""
    [found] = (cache / "index").glob("*.log")
    return found


def disks_of_one_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int,
                      name: str) -> Counted:
    """A counted store of ``n`` disks ``NAME-i`` holding ``b"NAME i"``, one pack each,
    written on machine "a" (the current machine after)."""
    backend = Counted(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(n):
        commit(writer, backend, f"{name}-{i}", f"{name} {i}".encode())
    return backend


def test_a_refresh_reads_only_the_indexes_it_has_not_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = disks_of_one_pack(tmp_path, monkeypatch, 20, "content")
    assert len(backend.list("index")) == 20

    backend.calls.clear()
    again = ObjectStore(backend)  # a later job on the machine that wrote them
    assert backend.calls == {"list index": 1}
    assert again.has(Digest.of(b"content 7"))

    backend.calls.clear()
    reader = ObjectStore(backend, load_index=False)  # a mount: reads what it needs, no listing
    assert reader.get(Digest.of(b"content 3")) == b"content 3"
    assert backend.calls == {"get packs": 1}

    on_machine(monkeypatch, tmp_path, "b")  # another runner commits one more pack
    commit(ObjectStore(backend), backend, "disk-b", b"from b")
    on_machine(monkeypatch, tmp_path, "a")
    backend.calls.clear()
    third = ObjectStore(backend)
    assert backend.calls == {"list index": 1, "get index": 1}
    assert third.get(Digest.of(b"from b")) == b"from b"


def test_two_machines_committing_at_once_see_each_others_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    caches = {m: tmp_path / f"machine-{m}" for m in "ab"}
    stores: dict[str, ObjectStore] = {}
    for m, cache in caches.items():
        monkeypatch.setenv("STICKYCI_CACHE_DIR", str(cache))
        stores[m] = ObjectStore(backend)  # each opens its own local index
    errors: list[BaseException] = []

    def run(m: str) -> None:
        try:
            for i in range(15):
                commit(stores[m], backend, f"{m}-{i}", f"{m} {i}".encode(), b"shared")
                stores[m].refresh()
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for cache in caches.values():
        monkeypatch.setenv("STICKYCI_CACHE_DIR", str(cache))
        fresh = ObjectStore(backend)  # from this machine's local index plus the listing
        for other in "ab":
            for i in range(15):
                assert fresh.get(Digest.of(f"{other} {i}".encode())) == f"{other} {i}".encode()
        assert fresh.get(Digest.of(b"shared")) == b"shared"


def test_after_a_gc_swept_objects_are_gone_and_repacked_ones_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    commit(writer, backend, "dropped", b"only in the dropped disk" * 50)
    big_dead, kept = os.urandom(200_000), b"kept by a live disk"
    commit(writer, backend, "mixed", big_dead, kept)
    commit(writer, backend, "mixed", kept)  # the big file's generation goes with the old ref
    before = ObjectStore(backend)  # a job whose store was loaded before the gc
    assert before.has(Digest.of(b"only in the dropped disk" * 50))
    on_machine(monkeypatch, tmp_path, "c")
    ObjectStore(backend)  # a runner that last looked before the gc
    on_machine(monkeypatch, tmp_path, "a")

    refs.delete_ref(backend, "dropped")
    report = gc(backend, grace=0)
    assert report.packs_deleted >= 1 and report.packs_repacked == 1

    after = ObjectStore(backend)  # from the local index, diffed against the listing
    assert not after.has(Digest.of(b"only in the dropped disk" * 50))
    assert not after.has(Digest.of(big_dead))
    assert after.get(Digest.of(kept)) == kept
    # The job loaded before the gc finds the repacked object where it lies now.
    assert before.get(Digest.of(kept)) == kept
    # A reader on a runner whose local index predates the gc (a mount: no listing first)
    # finds the repacked object, and never takes the swept one for stored.
    on_machine(monkeypatch, tmp_path, "c")
    reader = ObjectStore(backend, load_index=False)
    assert reader.get(Digest.of(kept)) == kept
    assert not reader.has(Digest.of(b"only in the dropped disk" * 50))
    on_machine(monkeypatch, tmp_path, "a")
    # And the local index itself no longer lists the swept packs.
    live = {f"index/{n.split('/')[1]}" for n in backend.list("packs")}
    assert LocalIndex(index_file(tmp_path / "machine-a")).open().names() <= live


def test_a_damaged_local_index_is_rebuilt_from_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    backend = Counted(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(5):
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    path = index_file(cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    backend.calls.clear()
    fresh = ObjectStore(backend)
    assert "damaged" in caplog.text
    assert backend.calls["get index"] == 5  # every index read again, none taken on trust
    assert all(fresh.get(Digest.of(f"object {i}".encode())) == f"object {i}".encode()
               for i in range(5))
    assert LocalIndex(path).open().names() == set(backend.list("index"))


def test_a_truncated_local_index_keeps_its_whole_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Counted(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(4):
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    path = index_file(cache)
    path.write_bytes(path.read_bytes()[:-10])  # a writer killed in its last append

    backend.calls.clear()
    fresh = ObjectStore(backend)
    assert backend.calls["get index"] == 1  # the torn record's pack, read again
    assert fresh.get(Digest.of(b"object 3")) == b"object 3"
    assert LocalIndex(path).open().names() == set(backend.list("index"))


def test_a_wrong_place_in_a_sealed_local_index_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    commit(writer, backend, "d", b"first object", b"second object")
    [name] = backend.list("index")
    pack_id = name.split("/")[1]
    first, second = Digest.of(b"first object"), Digest.of(b"second object")
    # A well-formed record that swaps where the two objects lie.
    plain = ObjectStore(backend, local_index=False)
    at_first, at_second = plain.locate(first), plain.locate(second)
    assert at_first and at_second
    rows = [(first.raw, at_second.offset, at_second.length),
            (second.raw, at_first.offset, at_first.length)]
    index_file(cache).write_bytes(encode_add([(pack_id, rows)]))

    fresh = ObjectStore(backend)
    assert fresh.get(first) == b"first object"
    assert fresh.get(second) == b"second object"


def test_a_partial_view_is_never_kept_and_each_token_has_its_own_index(
        served: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    cache = on_machine(monkeypatch, tmp_path, "runner")
    admin = served.backend()
    own = ObjectStore(admin, load_index=False)
    secret = own.put(b"team a's secret")
    snap = save_manifest(own, Manifest({"f": Entry("f", FILE, 0o644, 0, size=15,
                                                   chunks=[[secret.hex, 15]])}))
    assert admin.put_if("refs/team-a-x", disk_ref("team-a-x", snap), None)
    held_by_admin = {p for p in (cache / "index").glob("*.log")}
    assert len(held_by_admin) == 1  # the admin's own local index holds the pack

    team_b = served.backend(served.token(read=["team-b-*"], write=["team-b-*"]))
    assert team_b.cache_scope != admin.cache_scope
    seen_by_b = ObjectStore(team_b)
    assert not seen_by_b.has(secret)  # neither the admin's local index nor the pack's view
    for path in set((cache / "index").glob("*.log")) - held_by_admin:
        assert LocalIndex(path).open().empty  # the partial view was not kept


def test_a_local_index_log_is_compacted(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(70):  # one append per pack
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    path = index_file(cache)
    assert LocalIndex(path).open().records == 70
    assert len(LocalIndex(path).open().names()) == 70  # the first open compacted it
    table = LocalIndex(path).open()
    assert table.records == 0 and table.rows == 140  # a content object and a manifest each




def test_gc_takes_sizes_and_ages_from_the_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Counted(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(10):
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    refs.delete_ref(backend, "d3")
    backend.calls.clear()
    report = gc(backend, grace=0)
    assert report.packs_deleted == 1 and report.live_objects == 18
    # One read per index (gc reads every one from the store: it is where damage shows),
    # and no stat per pack: the listing gave their sizes and ages.
    assert backend.calls["get index"] == 10 and backend.calls["stat packs"] == 0


def test_a_commit_deduplicating_against_a_swept_pack_stores_it_again(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit takes the runner's local index without listing the store; if gc swept a
    pack it deduplicated against since, ``check_present`` finds out and the commit stores
    that content again instead of publishing a hole."""
    content = os.urandom(50_000)
    url = f"file://{env.store}"
    for key in ("old", "new"):
        ws = env.root / key
        disks.mount(key, ws, store=url)
        if key == "old":
            (ws / "data.bin").write_bytes(content)
            disks.commit(ws)
            refs.delete_ref(LocalBackend(env.store), "old")
            assert gc(url, grace=0).packs_deleted == 1  # this runner's local index lags
            continue
        (ws / "copy.bin").write_bytes(content)
        result = disks.commit(ws)
        assert result.committed and result.new_bytes == len(content)  # stored again
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(env.root / "another-runner"))
    target = env.root / "elsewhere"
    disks.mount("new", target, store=url)
    assert (target / "copy.bin").read_bytes() == content
    disks.unmount(target)


# --- the table: lookups in place, damage, gc, several processes --------------------------------


def compacted(cache: Path) -> Path:
    """Merge a machine's local index into its table now; the file's path."""
    path = index_file(cache)
    LocalIndex(path).compact()
    view = LocalIndex(path).open()
    assert view.records == 0 and view.rows > 0
    return path


def flip(path: Path, at: int) -> None:
    """Change one byte of ``path`` in place (negative ``at``: from the end)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x55
    path.write_bytes(bytes(data))


def damage(path: Path, where: str, victim: Digest) -> None:
    """Damage the table of a local index at ``where``."""
    if where == "header":
        flip(path, 9)  # the row count
    elif where == "bucket":
        flip(path, path.read_bytes().index(victim.raw) + 64)  # the victim's offset
    elif where == "pack list":
        flip(path, -1)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("where", ["header", "bucket", "pack list", "truncated"])
def test_a_damaged_table_is_detected_and_rebuilt(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    backend = Counted(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(12):
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    path = compacted(cache)
    victim = Digest.of(b"object 5")
    damage(path, where, victim)

    backend.calls.clear()
    fresh = ObjectStore(backend)
    assert all(fresh.get(Digest.of(f"object {i}".encode())) == f"object {i}".encode()
               for i in range(12))
    assert "damaged" in caplog.text
    assert backend.calls["get index"] == 12  # every index read again, none taken on trust
    assert LocalIndex(path).open().names() == set(backend.list("index"))  # rebuilt


def test_a_lookup_reads_only_its_bucket_of_the_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Damage shows where it is read, and only there: a lookup reads one bucket."""
    backend = Counted(tmp_path / "store")
    cache = on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    contents = [f"object {i}".encode() for i in range(40)]
    for i, c in enumerate(contents):
        commit(writer, backend, f"d{i}", c)
    path = compacted(cache)
    assert LocalIndex(path).open().rows == 80  # 40 objects and their 40 manifests
    victim = Digest.of(contents[0])
    # 80 rows make 16 buckets, by the digest's first four bits.
    elsewhere = [c for c in contents if Digest.of(c).raw[0] >> 4 != victim.raw[0] >> 4]
    damage(path, "bucket", victim)

    backend.calls.clear()
    reader = ObjectStore(backend, load_index=False)  # a mount
    assert [reader.get(Digest.of(c)) for c in elsewhere] == elsewhere
    assert "damaged" not in caplog.text
    assert backend.calls == {"get packs": len(elsewhere)}  # no listing, no index read
    assert reader.get(victim) == contents[0]
    assert "damaged" in caplog.text and backend.calls["get index"] == 40


def test_a_table_from_before_a_gc_never_passes_swept_objects_off_as_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    dropped, big_dead, kept = b"only in the dropped disk" * 50, os.urandom(200_000), b"kept"
    commit(writer, backend, "dropped", dropped)
    commit(writer, backend, "mixed", big_dead, kept)
    commit(writer, backend, "mixed", kept)
    stale = on_machine(monkeypatch, tmp_path, "c")
    ObjectStore(backend)  # this runner last looked before the gc...
    path = compacted(stale)  # ... and its table says so
    before = LocalIndex(path).open().names()

    on_machine(monkeypatch, tmp_path, "a")
    refs.delete_ref(backend, "dropped")
    assert gc(backend, grace=0).packs_repacked == 1

    on_machine(monkeypatch, tmp_path, "c")
    committer = ObjectStore(backend, listing=False)  # takes the stale table as the index
    assert committer.has(Digest.of(dropped))
    with pytest.raises(NotFound, match="concurrent gc"):
        committer.check_present([Digest.of(dropped).raw])
    assert not committer.has(Digest.of(dropped))  # forgotten, so it is stored again
    reader = ObjectStore(backend, load_index=False)  # a mount: no listing first
    assert reader.get(Digest.of(kept)) == kept  # found where the repack put it
    assert not reader.has(Digest.of(dropped)) and not reader.has(Digest.of(big_dead))
    table = LocalIndex(path).open()
    live = set(backend.list("index"))
    assert not table.needs_compaction  # the forgets were merged into the table at once
    assert table.names() == live and before - live  # the swept packs are out of it
    assert table.find(Digest.of(dropped).raw) is None


WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from stickyci.store import LocalBackend, ObjectStore
    from stickyci.store.localindex import LocalIndex

    backend = LocalBackend(Path(sys.argv[1]))
    me, local = sys.argv[2], LocalIndex.for_backend(backend)
    assert local is not None
    for i in range(60):
        store = ObjectStore(backend, load_index=False)
        store.put(f"{me} {i}".encode())
        store.flush()  # one pack, one record appended
        if i % 7 == 0:
            local.compact()
        view = local.open()  # and compacts when the tail is due
        assert view.find(next(iter(store.written.values()))[4:36]) is not None
    """)


def test_processes_appending_and_compacting_at_once_lose_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    cache = on_machine(monkeypatch, tmp_path, "a")
    LocalBackend(store)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(store), f"w{n}"],
                                stderr=subprocess.PIPE, text=True) for n in range(3)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    backend = Counted(store)
    view = LocalIndex(index_file(cache)).open()
    assert view.names() == set(backend.list("index")) and len(view.names()) == 180
    backend.calls.clear()
    committer = ObjectStore(backend, listing=False)
    reader = ObjectStore(backend, load_index=False)
    for n in range(3):
        for i in range(60):
            content = f"w{n} {i}".encode()
            assert committer.has(Digest.of(content))
            assert reader.get(Digest.of(content)) == content
    assert backend.calls == {"get packs": 180}  # every place from the local index


def test_a_first_look_at_a_store_leaves_a_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner that reads every index merges them into the table itself, so the next
    job opens a table, not a tail it would read whole."""
    monkeypatch.setattr(localindex, "COMPACT_ROWS", 10)
    backend = LocalBackend(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    writer = ObjectStore(backend, load_index=False)
    for i in range(8):
        commit(writer, backend, f"d{i}", f"object {i}".encode())
    cache = on_machine(monkeypatch, tmp_path, "b")
    ObjectStore(backend)  # reads the 8 indexes: one record of 16 entries
    view = LocalIndex(index_file(cache)).open()
    assert view.records == 0 and view.rows == 16


def test_a_runner_new_to_the_store_reads_only_the_indexes_its_snapshot_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = disks_of_one_pack(tmp_path, monkeypatch, 30, "other")
    first = tmp_path / "on-a"
    disks.mount("wanted", first, strategy="copy", store=backend)
    blob = os.urandom(1 << 20)
    (first / "lib.a").write_bytes(blob)
    (first / "main.c").write_text("int main;")
    disks.commit(first)
    ref = refs.read_ref(backend, "wanted")
    assert ref is not None and ref.latest is not None
    hint = set(ref.latest.packs)
    assert len(hint) == 1  # one commit, one pack: manifest and content

    on_machine(monkeypatch, tmp_path, "b")  # a runner that never saw the store
    backend.calls.clear()
    second = tmp_path / "on-b"
    disks.mount("wanted", second, strategy="copy", store=backend)
    assert (second / "lib.a").read_bytes() == blob
    assert backend.calls["list index"] == 0 and backend.calls["get index"] == len(hint)
    (second / "main.c").write_text("int main(void);")
    disks.commit(second)
    ref = refs.read_ref(backend, "wanted")
    assert ref is not None and ref.latest is not None
    assert [g.packs for g in ref.generations[:-1]] == [()]  # only the newest keeps one
    # The incremental commit adds its own pack to the base's hint.
    assert hint < set(ref.latest.packs) and len(ref.latest.packs) == 2

    on_machine(monkeypatch, tmp_path, "c")
    backend.calls.clear()
    third = tmp_path / "on-c"
    disks.mount("wanted", third, strategy="copy", store=backend)
    assert (third / "lib.a").read_bytes() == blob
    assert (third / "main.c").read_text() == "int main(void);"
    assert backend.calls["list index"] == 0 and backend.calls["get index"] == 2


def test_a_false_pack_hint_costs_a_listing_not_the_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer of the ref may name any packs as its snapshot's: a runner reads them like any
    index, finds the snapshot elsewhere, and mounts what the ref names, no more."""
    backend = Counted(tmp_path / "store")
    on_machine(monkeypatch, tmp_path, "a")
    objects = ObjectStore(backend, load_index=False)
    commit(objects, backend, "decoy", b"decoy content")
    [decoy_pack] = backend.list("packs")
    commit(objects, backend, "victim", b"the real content")
    ref = refs.read_ref(backend, "victim")
    assert ref is not None and ref.latest is not None
    lie = (Digest.parse(decoy_pack.split("/", 1)[1]), Digest.of(b"no such pack"))
    ref.generations = [replace(ref.latest, packs=lie)]
    backend.put("refs/victim", ref.encode())

    on_machine(monkeypatch, tmp_path, "b")
    backend.calls.clear()
    target = tmp_path / "on-b"
    disks.mount("victim", target, strategy="copy", store=backend)
    assert (target / "f0").read_bytes() == b"the real content"
    assert backend.calls["list index"] == 1  # the hint failed: the usual listing found it


def test_an_object_in_two_packs_is_found_in_whichever_is_still_live(tmp_path: Path) -> None:
    index = LocalIndex(tmp_path / "index.log")
    obj = Digest.of(b"stored twice").raw
    first, second = sorted(Digest.of(bytes([i])).hex for i in range(2))
    index.add([(first, [(obj, 0, 10)]), (second, [(obj, 20, 10)])])
    index.compact()  # into the table, where the two rows lie side by side
    for gone, left in ((second, (f"packs/{first}", 0, 10)), (first, (f"packs/{second}", 20, 10))):
        view = index.open()
        assert view.rows == 2 and view.find(obj) is not None
        view.exclude([f"packs/{gone}"])
        assert view.find(obj) == left
        view.exclude([left[0]])
        assert view.find(obj) is None
