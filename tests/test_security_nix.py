"""Attacks on the Nix binary cache: every writer is hostile, every reader may be nosy.

Scopes hold across caches; a narinfo is accepted only for a NAR the server received and
hashed in the same cache; names never become paths; bodies are bounded, compressed or not;
a writer's signature is never served; damaged or missing chunks fail before a byte is sent,
and so does a stored patch list that points outside its NAR, overlaps, or restores the wrong
store path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from nix_helpers import Nix, client, fresh_path, narinfo, needs_nix, public_key, settled, upload
from server import Server, error, start_server, store_dir

from stickyci.server.nix import nix32, parse_narinfo, pin_name, verify
from stickyci.server.nix.spool import SPOOL_DIR
from stickyci.store import LocalBackend

pytestmark = needs_nix
NAR_HEAD = b"\x0d" + bytes(7) + b"nix-archive-1"
"""How every NAR starts: a body without it is refused as no NAR before any other check."""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("nixsec"), args=["--max-body", "4M"]) as s:
        yield s


@pytest.fixture(scope="module")
def nix(tmp_path_factory: pytest.TempPathFactory) -> Nix:
    return Nix(tmp_path_factory.mktemp("nixclient"))


def test_a_token_for_one_cache_can_neither_read_nor_write_another(srv: Server, nix: Nix,
                                                                  tmp_path: Path) -> None:
    token_a = srv.token("--write", "cache-a")
    admin_b = client(srv, "cache-b", srv.admin)
    path, nar = fresh_path(nix, "in-b")
    assert upload(admin_b, path, nar).status_code == 200
    as_a = client(srv, "cache-b", token_a)
    hash_part = Path(path).name[:32]
    nar_url = f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar.zst"
    for method, url in [("GET", "/nix-cache-info"), ("GET", f"/{hash_part}.narinfo"),
                        ("HEAD", f"/{hash_part}.narinfo"), ("GET", nar_url),
                        ("PUT", f"/{hash_part}.narinfo"), ("PUT", nar_url[:-4])]:
        r = as_a.request(method, url, content=b"x" if method == "PUT" else None)
        assert r.status_code == 403, (method, url, r.status_code)
        if method != "HEAD":
            assert "cache-b" in error(r).error and token_a.split("_")[1] in error(r).error
    # the real client, with the token in its netrc, is refused the same way
    reader = Nix(tmp_path / "reader")
    netrc = reader.netrc("127.0.0.1", token_a)
    got = reader.substitute(f"{srv.url}/nix/cache-b", public_key(srv.state, "cache-b"), path,
                            netrc=netrc)
    assert got.returncode != 0 and not reader.has(path)
    other, _ = fresh_path(reader, "from-a")
    assert reader.copy_to(f"{srv.url}/nix/cache-b", other, netrc=netrc).returncode != 0
    assert client(srv, "cache-b", srv.admin).get(
        f"/{Path(other).name[:32]}.narinfo").status_code == 404
    # a read-only token reads but does not write; no token at all is asked for one
    reader_b = client(srv, "cache-b", srv.token("--read", "cache-b"))
    assert reader_b.get(f"/{hash_part}.narinfo").status_code == 200
    assert reader_b.put(f"/{hash_part}.narinfo", content=narinfo(path, nar)).status_code == 403
    anonymous = client(srv, "cache-b", None)
    assert anonymous.get(f"/{hash_part}.narinfo").status_code == 401
    assert anonymous.put(nar_url[:-4], content=nar).status_code == 401


def test_anonymous_read_reads_but_never_writes(nix: Nix, tmp_path: Path) -> None:
    with start_server(tmp_path / "srv", args=["--anonymous-read"]) as s:
        path, nar = fresh_path(nix, "public")
        assert upload(client(s, "pub", s.admin), path, nar).status_code == 200
        anonymous = client(s, "pub", None)
        info = anonymous.get(f"/{Path(path).name[:32]}.narinfo")
        assert info.status_code == 200 and f"StorePath: {path}" in info.text
        other, other_nar = fresh_path(nix, "sneaky")
        r = anonymous.put(f"/nar/{nix32(hashlib.sha256(other_nar).digest())}.nar",
                          content=other_nar)
        assert r.status_code == 401
        assert anonymous.put(f"/{Path(other).name[:32]}.narinfo",
                             content=narinfo(other, other_nar)).status_code == 401


def test_a_narinfo_must_name_a_nar_the_server_hashed_in_the_same_cache(srv: Server,
                                                                       nix: Nix) -> None:
    c = client(srv, "honest", srv.admin)
    path, nar = fresh_path(nix, "hashed")
    hash_part = Path(path).name[:32]
    wrong = hashlib.sha256(nar + b"x").digest()
    r = upload(c, path, nar, NarHash=f"sha256:{nix32(wrong)}")
    assert r.status_code == 400 and "upload the NAR first" in error(r).error
    r = c.put(f"/{hash_part}.narinfo", content=narinfo(path, nar, NarSize=str(len(nar) + 1)))
    assert r.status_code == 400 and "NarSize" in error(r).error
    assert c.get(f"/{hash_part}.narinfo").status_code == 404
    # a NAR uploaded to another cache does not count: its hash is public, its bytes are not
    other = client(srv, "elsewhere", srv.admin)
    r = other.put(f"/{hash_part}.narinfo", content=narinfo(path, nar))
    assert r.status_code == 400 and "cache elsewhere has no NAR" in error(r).error
    assert other.get(f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar.zst").status_code == 404


@pytest.mark.parametrize("url", [
    "/nix/../x.narinfo", "/nix/%2e%2e/nix-cache-info", "/nix/a.b/nix-cache-info",
    "/nix/c/..%2f..%2fetc%2fpasswd.narinfo", "/nix/c/nar/..%2f..%2fx.nar",
    "/nix/c/nar/" + "0" * 52 + ".nar.gz", "/nix/c/" + "e" * 32 + ".narinfo",
    "/nix/c/nar/" + "z" * 52 + ".nar.zst",  # 52 digits too big for a SHA-256
])
def test_names_that_are_not_nix_names_are_refused(srv: Server, url: str) -> None:
    auth = {"authorization": f"Bearer {srv.admin}"}
    for method in ("GET", "PUT"):
        r = httpx2.request(method, srv.url + url, content=b"x", headers=auth)
        assert r.status_code in (400, 404), (method, url, r.status_code)
    assert not (store_dir(srv).parent / "x").exists()
    assert not any(store_dir(srv).parent.glob("etc*"))


@pytest.mark.parametrize("field,value", [
    ("StorePath", "/nix/store/../../etc/passwd"),
    ("StorePath", "/tmp/" + "0" * 32 + "-x"),
    ("References", "../../../etc/passwd"),
    ("References", "0" * 32 + "-ok /nix/store/" + "1" * 32 + "-absolute"),
    ("Deriver", "../x.drv"),
    ("NarSize", "-1"),
    ("NarHash", "md5:00000000000000000000000000000000"),
    ("CA", "fixed:r:sha256:$(reboot)"),
])
def test_a_narinfo_field_outside_nix_grammar_is_refused(srv: Server, nix: Nix, field: str,
                                                       value: str) -> None:
    c = client(srv, "strict", srv.admin)
    path, nar = fresh_path(nix, "strict")
    hash_part = Path(path).name[:32]
    c.put(f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar", content=nar).raise_for_status()
    r = c.put(f"/{hash_part}.narinfo", content=narinfo(path, nar, **{field: value}))
    assert r.status_code == 400, r.text
    assert field in error(r).error
    assert c.get(f"/{hash_part}.narinfo").status_code == 404


def test_oversized_bodies_are_refused_compressed_or_not(srv: Server, nix: Nix) -> None:
    c = client(srv, "big", srv.admin)
    path, _ = fresh_path(nix, "big-info")
    huge = f"StorePath: {path}\nReferences: " + ("0" * 32 + "-x ") * 40_000 + "\n"
    r = c.put(f"/{Path(path).name[:32]}.narinfo", content=huge)
    assert r.status_code == 413
    r = c.put("/nar/" + "0" * 52 + ".nar", content=NAR_HEAD + os.urandom(5 << 20))  # 4M max
    assert r.status_code == 413
    # a small xz body that decompresses past the limit: refused before it fills the disk
    bomb = lzma.compress(NAR_HEAD + bytes(64 << 20))
    assert len(bomb) < 1 << 20
    r = c.put("/nar/" + "1" * 52 + ".nar.xz", content=bomb)
    assert r.status_code == 413 and "uncompressed" in error(r).error
    # What the refused uploads wrote is gone, also what was being written when they were cut.
    assert not list((srv.state / SPOOL_DIR).glob(".*.part"))


@pytest.mark.parametrize("name,body,message", [
    ("0" * 52 + ".nar", b"not a nar at all", "not a NAR"),
    ("0" * 52 + ".nar.xz", lzma.compress(NAR_HEAD + b"x" * 1000)[:-20], "truncated"),
    ("0" * 52 + ".nar.xz", lzma.compress(b"x" * 1000), "not a NAR"),
    ("0" * 52 + ".nar.xz", b"garbage, not xz", "not valid xz"),
    ("0" * 52 + ".nar.br", b"whatever", "not accepted"),
])
def test_a_nar_that_is_not_one_is_refused(srv: Server, name: str, body: bytes,
                                          message: str) -> None:
    r = client(srv, "junk", srv.admin).put(f"/nar/{name}", content=body)
    assert r.status_code == 400 and message in error(r).error


def test_the_writers_signature_is_dropped_and_the_server_signs(srv: Server, nix: Nix) -> None:
    c = client(srv, "resign", srv.admin)
    path, nar = fresh_path(nix, "resign")
    forged = "resign-1:" + base64.b64encode(bytes(64)).decode()
    assert upload(c, path, nar, Sig=forged).status_code == 200
    served = c.get(f"/{Path(path).name[:32]}.narinfo").text
    sigs = [line[5:] for line in served.splitlines() if line.startswith("Sig: ")]
    assert len(sigs) == 1 and sigs[0] != forged
    info = parse_narinfo(served.encode())
    assert verify(public_key(srv.state, "resign"), info.fingerprint(), sigs[0])


def _packs(srv: Server) -> set[Path]:
    packs = store_dir(srv) / "packs"
    return set(packs.iterdir()) if packs.exists() else set()


def _only_pack(srv: Server, before: set[Path]) -> Path:
    packs = _packs(srv) - before
    assert len(packs) == 1, packs
    return packs.pop()


def test_a_damaged_or_missing_chunk_fails_before_a_byte_is_sent(srv: Server, nix: Nix,
                                                                tmp_path: Path) -> None:
    c = client(srv, "damaged", srv.admin)
    paths = []
    for name in ("corrupt", "missing"):
        before = _packs(srv)
        path, nar = fresh_path(nix, name, size=300_000)
        assert upload(c, path, nar).status_code == 200
        settled(srv.state)
        paths.append((path, nar, _only_pack(srv, before)))
    (path, nar, pack), (_, gone_nar, gone_pack) = paths
    data = bytearray(pack.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk's envelope
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    gone_pack.unlink()

    r = c.get(f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar.zst")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
    assert "damaged" in error(r).error
    r = c.get(f"/nar/{nix32(hashlib.sha256(gone_nar).digest())}.nar.zst")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    reader = Nix(tmp_path / "reader")
    got = reader.substitute(f"{srv.url}/nix/damaged", public_key(srv.state, "damaged"), path,
                            netrc=reader.netrc("127.0.0.1", srv.admin))
    assert got.returncode != 0 and not reader.has(path)


def _with_reference(nix: Nix, name: str) -> tuple[str, bytes, bytes]:
    """A store path whose content names another store path twice; its NAR and that name."""
    dep = b"0123456789abcdfghijklmnpqrsvwxyz-dep-1.0"
    body = os.urandom(300_000) + b"/nix/store/" + dep + b"/lib\0" + os.urandom(1000) \
        + b"/nix/store/" + dep + b"\0"
    path = nix.add_tree(name, {"data": body})
    return path, nix.dump(path), dep


def _swap_patch_list(srv: Server, cache: str, nar: bytes, listing: bytes) -> None:
    """Give the pin of a stored NAR ``listing`` as its patch list: what a store writer (or
    damage) could leave behind."""
    backend = LocalBackend(store_dir(srv))
    name = pin_name(cache, hashlib.sha256(nar).digest())
    pin = json.loads(backend.get(name))
    assert pin["refs"]  # the upload's own
    backend.put(name, json.dumps({**pin, "refs": listing.decode()}).encode())


@pytest.mark.parametrize(("listing", "why"), [
    (b"stickyci-nix-refs 1\n%d 0123456789abcdfghijklmnpqrsvwxyz-dep-1.0\n", "outside"),
    (b"stickyci-nix-refs 1\n0 0123456789abcdfghijklmnpqrsvwxyz-dep-1.0\n"
     b"30 0123456789abcdfghijklmnpqrsvwxyz-dep-1.0\n", "overlaps"),
    (b"stickyci-nix-refs 1\n%d zyxwvsrqpnmlkjihgfdcba9876543210-dep-1.0\n", "hash"),
])
def test_a_stored_patch_list_that_is_out_of_bounds_or_wrong_is_never_served(
        srv: Server, nix: Nix, tmp_path: Path, listing: bytes, why: str) -> None:
    c = client(srv, f"patched-{why}", srv.admin)
    path, nar, dep = _with_reference(nix, f"patched-{why}")
    assert upload(c, path, nar).status_code == 200
    settled(srv.state)
    url = f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar.zst"
    assert c.get(url).status_code == 200  # served whole before the damage
    at = nar.index(dep)
    # "outside": the last byte of the NAR; "hash": where the name is, but another name, in
    # bounds and well formed: only the NarHash check can tell
    offset = len(nar) - 10 if why == "outside" else at
    _swap_patch_list(srv, f"patched-{why}", nar,
                     listing % offset if b"%d" in listing else listing)
    r = c.get(url)
    assert r.status_code == 500 and "damaged" in error(r).error, r.text
    assert dep not in r.content
    reader = Nix(tmp_path / "reader")
    got = reader.substitute(f"{srv.url}/nix/patched-{why}",
                            public_key(srv.state, f"patched-{why}"), path,
                            netrc=reader.netrc("127.0.0.1", srv.admin))
    assert got.returncode != 0 and not reader.has(path)
