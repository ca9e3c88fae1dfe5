"""The Nix cache answers an upload once the NAR is spooled, and stores it afterwards: a spooled
NAR is served and its narinfo accepted at once, survives the store refusing writes and the
server being killed, is never served or stored when damaged on disk, and stays in its cache's
scope.

The store is made to refuse writes for real: its ``packs`` directory is made immutable
(``chattr +i``), which even root cannot write into.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from nix_helpers import (
    Nix,
    client,
    fresh_path,
    metric,
    narinfo,
    needs_nix,
    public_key,
    settled,
    upload,
)
from server import error, start_server

from stickyci.server.nix import nix32, pin_name
from stickyci.server.nix.spool import SPOOL_DIR, Spool
from stickyci.store import LocalBackend

pytestmark = [needs_nix, pytest.mark.root]


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A store whose packs directory cannot be written, and a switch back."""
    store = tmp_path / "store"
    packs = store / "packs"
    packs.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(packs)], check=True)
    try:
        yield store, packs
    finally:
        subprocess.run(["chattr", "-i", str(packs)], check=True)


def _thaw(packs: Path) -> None:
    subprocess.run(["chattr", "-i", str(packs)], check=True)


def _spooled(state: Path) -> list[Path]:
    return sorted((state / SPOOL_DIR).glob("*.nar"))


def _pinned(store: Path, cache: str, nar: bytes) -> bool:
    return LocalBackend(store).stat(pin_name(cache, hashlib.sha256(nar).digest())) is not None


def test_a_spooled_nar_is_served_while_the_store_refuses_it_then_stored(
        tmp_path: Path, frozen: tuple[Path, Path]) -> None:
    store, packs = frozen
    nix = Nix(tmp_path / "writer")
    with start_server(tmp_path / "srv", store_url=f"file://{store}") as srv:
        c = client(srv, "spool", srv.admin)
        path, nar = fresh_path(nix, "spooled", size=200_000)
        assert upload(c, path, nar).status_code == 200  # NAR and narinfo both accepted
        assert [p.name for p in _spooled(srv.state)] == [
            f"spool.{nix32(hashlib.sha256(nar).digest())}.nar"]
        assert not _pinned(store, "spool", nar)
        # Served from the spool meanwhile, to the real Nix, verified whole.
        reader = Nix(tmp_path / "reader")
        got = reader.substitute(f"{srv.url}/nix/spool", public_key(srv.state, "spool"), path,
                                netrc=reader.netrc("127.0.0.1", srv.admin))
        assert got.returncode == 0, got.stderr
        assert reader.dump(path) == nar
        assert _spooled(srv.state)  # still not stored: the store still refuses
        assert metric(srv.url, "stickyci_nix_spool_nars") == 1
        assert metric(srv.url, "stickyci_nix_spool_bytes") == len(nar)
        _thaw(packs)
        settled(srv.state)
        assert _pinned(store, "spool", nar)
        assert metric(srv.url, "stickyci_nix_spool_nars") == 0
        assert "not in the store yet" in srv.log.read_text()  # the refusal was reported


def test_a_nar_evicted_while_spooled_is_still_bounded_by_max_size(
        tmp_path: Path, frozen: tuple[Path, Path]) -> None:
    # Two 200 kB NARs under a 300 kB limit, while the store refuses writes: the first one's
    # pin is evicted before it exists. Once both are stored, the next upload must still find
    # it in the accounting, else the store keeps more than --max-size for ever.
    store, packs = frozen
    nix = Nix(tmp_path / "writer")
    with start_server(tmp_path / "srv", store_url=f"file://{store}",
                      args=("--max-size", "300000")) as srv:
        c = client(srv, "lru", srv.admin)
        for i in range(2):
            assert upload(c, *fresh_path(nix, f"lru-{i}", size=200_000)).status_code == 200
        _thaw(packs)
        settled(srv.state)
        assert upload(c, *fresh_path(nix, "lru-2", size=200_000)).status_code == 200
        settled(srv.state)
        pins = [p for p in (store / "roots").iterdir() if p.name.startswith("nix.lru.")]
        assert len(pins) == 1


def test_a_nar_spooled_before_the_server_was_killed_is_stored_by_the_next_one(
        tmp_path: Path, frozen: tuple[Path, Path]) -> None:
    store, packs = frozen
    nix = Nix(tmp_path / "writer")
    path, nar = fresh_path(nix, "survivor", size=200_000)
    with start_server(tmp_path / "srv", store_url=f"file://{store}") as srv:
        assert upload(client(srv, "spool", srv.admin), path, nar).status_code == 200
        port, state = srv.port, srv.state
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
    assert _spooled(state) and not _pinned(store, "spool", nar)
    _thaw(packs)
    with start_server(tmp_path / "srv", store_url=f"file://{store}", port=port) as again:
        settled(again.state)
        assert _pinned(store, "spool", nar)
        r = client(again, "spool", again.admin).get(
            f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar")
        assert r.status_code == 200 and r.content == nar


def test_a_spooled_nar_damaged_on_disk_is_neither_served_nor_stored(
        tmp_path: Path, frozen: tuple[Path, Path]) -> None:
    store, packs = frozen
    nix = Nix(tmp_path / "writer")
    path, nar = fresh_path(nix, "damaged", size=200_000)
    with start_server(tmp_path / "srv", store_url=f"file://{store}") as srv:
        assert upload(client(srv, "spool", srv.admin), path, nar).status_code == 200
        port = srv.port
    # Damaged while no server runs, so no ingester read it before (one that did would store
    # the bytes it read and hashed, which are right).
    [spooled] = _spooled(srv.state)
    data = bytearray(spooled.read_bytes())
    data[-100] ^= 0xFF
    spooled.write_bytes(bytes(data))
    with start_server(tmp_path / "srv", store_url=f"file://{store}", port=port) as srv:
        c = client(srv, "spool", srv.admin)
        url = f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar.zst"
        r = c.get(url)
        assert r.status_code == 500 and "damaged" in error(r).error, r.text
        _thaw(packs)
        wait_for(lambda: not _spooled(srv.state), "the damaged NAR to leave the spool")
        assert not _pinned(store, "spool", nar)
        assert "is damaged, removed" in srv.log.read_text()
        # Its narinfo now names nothing: a miss, never a NAR that does not hash right.
        assert c.get(f"/{Path(path).name[:32]}.narinfo").status_code == 404
        assert c.get(url).status_code == 404


def test_a_spooled_nar_stays_in_its_caches_scope(tmp_path: Path,
                                                frozen: tuple[Path, Path]) -> None:
    store, _ = frozen
    nix = Nix(tmp_path / "writer")
    with start_server(tmp_path / "srv", store_url=f"file://{store}") as srv:
        path, nar = fresh_path(nix, "scoped", size=200_000)
        assert upload(client(srv, "team-b", srv.admin), path, nar).status_code == 200
        assert _spooled(srv.state)
        name = nix32(hashlib.sha256(nar).digest())
        as_a = client(srv, "team-b", srv.token("--write", "team-a"))
        assert as_a.get(f"/nar/{name}.nar").status_code == 403
        assert as_a.get(f"/{Path(path).name[:32]}.narinfo").status_code == 403
        # Its own cache a's token reads, under its own name, finds nothing of b's.
        own = client(srv, "team-a", srv.token("--write", "team-a"))
        assert own.get(f"/nar/{name}.nar").status_code == 404
        assert own.get(f"/{Path(path).name[:32]}.narinfo").status_code == 404
        # A narinfo for it in cache a is refused: a has no such NAR, spooled or stored.
        refused = own.put(f"/{Path(path).name[:32]}.narinfo", content=narinfo(path, nar))
        assert refused.status_code == 400 and "no NAR" in error(refused).error


def test_an_upload_a_dead_server_left_unfinished_is_removed_at_start(tmp_path: Path) -> None:
    with start_server(tmp_path / "srv") as srv:
        port, state = srv.port, srv.state
    part = state / SPOOL_DIR / ".0123456789abcdef.part"
    part.write_bytes(b"half a NAR")
    os.utime(part)
    with start_server(tmp_path / "srv", port=port):
        assert not part.exists()


def test_the_ingester_waits_for_a_quiet_moment_but_not_for_ever(tmp_path: Path) -> None:
    # Its Python work would slow the requests of a nix copy; a steady stream of requests
    # must not stop it either.
    spool = Spool(tmp_path, lambda *_: None)
    got: list[bytes] = []
    with spool.serving():
        taker = threading.Thread(target=lambda: got.extend(spool.paced([b"a", b"b"])))
        taker.start()
        taker.join(0.3)
        assert got == []  # a request is being answered
        wait_for(lambda: got == [b"a", b"b"], "the ingester to go on after its patience")
    assert list(spool.paced([b"c"])) == [b"c"]  # nothing is being answered now


def test_a_spool_whose_directory_went_has_nothing_pending(tmp_path: Path) -> None:
    # An in-process server's state directory can go before its ingester thread does. (The
    # store here is always down, so the ingester never takes the file, whenever it looks.)
    def down(cache: str, nar_hash: bytes, f: object) -> None:
        raise OSError("the store is down")

    spool = Spool(tmp_path / "state", down)
    (spool.root / f"c.{nix32(bytes(32))}.nar").write_bytes(b"x")
    assert [s.cache for s in spool.pending()] == ["c"]
    shutil.rmtree(tmp_path / "state")
    assert spool.pending() == []
