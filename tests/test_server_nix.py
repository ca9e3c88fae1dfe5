"""``stickyci serve`` as a Nix binary cache, driven by the real Nix 2.8.

``nix copy --to`` uploads, a second client with an empty store substitutes, trusting only the
cache's key; a signature that does not verify is refused by Nix; a new version of a 50 MiB store
path adds only its changed chunks; gc keeps what narinfos reach and frees what eviction drops.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from helpers import MiB
from nix_helpers import (
    Nix,
    metric,
    needs_nix,
    public_key,
    random_files,
    settled,
    tree_bytes,
)
from server import Server, start_server, store_dir

from stickyci.server.nix import nix32
from stickyci.server.nix.narinfo import parse_nix32

pytestmark = needs_nix


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("nixsrv")) as s:
        yield s


def basic(token: str) -> dict[str, str]:
    """HTTP Basic credentials as Nix sends them from its netrc."""
    return {"authorization": "Basic " + base64.b64encode(f"nix:{token}".encode()).decode()}


def stickyci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stickyci", *args], capture_output=True,
                          text=True)


def test_copy_then_substitute_into_an_empty_store(srv: Server, tmp_path: Path) -> None:
    token = srv.token("--write", "team-*")
    url = f"{srv.url}/nix/team-one"
    writer = Nix(tmp_path / "writer")
    a, b = writer.build_chain("roundtrip")
    copied = writer.copy_to(url, b, netrc=writer.netrc("127.0.0.1", token))  # xz, Nix's default
    assert copied.returncode == 0, copied.stderr
    hits = metric(srv.url, "stickyci_cache_lookups_total", kind="narinfo", result="hit")
    sent = metric(srv.url, "stickyci_bytes_out_total", route="nix")

    reader = Nix(tmp_path / "reader")
    assert not reader.has(b)
    key = public_key(srv.state, "team-one")
    got = reader.substitute(url, key, b, netrc=reader.netrc("127.0.0.1", token))
    assert got.returncode == 0, got.stderr
    assert reader.read(b) == writer.read(b) and reader.read(a) == writer.read(a)
    assert reader.dump(b) == writer.dump(b)  # the same NAR, references and all
    assert reader.run("nix-store", "--verify-path", b).returncode == 0
    assert metric(srv.url, "stickyci_cache_lookups_total", kind="narinfo",
                  result="hit") >= hits + 2
    assert metric(srv.url, "stickyci_bytes_out_total", route="nix") > sent


def test_a_missing_path_is_a_miss_and_nix_builds_nothing_from_it(srv: Server,
                                                                  tmp_path: Path) -> None:
    token = srv.token("--read", "team-*")
    reader = Nix(tmp_path / "reader")
    path = Nix(tmp_path / "other").add_tree("never-copied", {"f": b"x"})
    misses = metric(srv.url, "stickyci_cache_lookups_total", kind="narinfo", result="miss")
    got = reader.substitute(f"{srv.url}/nix/team-empty", "team-empty-1:" + "A" * 43 + "=",
                            path, netrc=reader.netrc("127.0.0.1", token))
    assert got.returncode != 0 and not reader.has(path)
    assert metric(srv.url, "stickyci_cache_lookups_total", kind="narinfo",
                  result="miss") > misses


def _mirror(srv: Server, token: str, cache: str, paths: list[str], into: Path,
            tamper: str | None = None) -> str:
    """Copy paths' narinfos and NARs from the server into a ``file://`` binary cache,
    flipping a bit of the signature of the path ``tamper``; the cache's URL."""
    client = httpx2.Client(base_url=f"{srv.url}/nix/{cache}", headers=basic(token))
    (into / "nar").mkdir(parents=True)
    (into / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    for path in paths:
        hash_part = Path(path).name[:32]
        info = client.get(f"/{hash_part}.narinfo").raise_for_status().text
        fields = dict(line.split(": ", 1) for line in info.splitlines())
        nar = client.get(f"/{fields['URL']}").raise_for_status().content
        (into / fields["URL"]).write_bytes(nar)
        if path == tamper:
            name, sig = fields["Sig"].split(":", 1)
            raw = bytearray(base64.b64decode(sig))
            raw[0] ^= 1
            info = info.replace(fields["Sig"], f"{name}:{base64.b64encode(raw).decode()}")
        (into / f"{hash_part}.narinfo").write_text(info)
    return f"file://{into}"


def test_nix_accepts_the_cache_signature_and_refuses_a_tampered_one(srv: Server,
                                                                     tmp_path: Path) -> None:
    token = srv.token("--write", "signed")
    writer = Nix(tmp_path / "writer")
    # Built, not added: Nix takes a content-addressed path on its hash, signed or not.
    dep, path = writer.build_chain("signed")
    assert writer.copy_to(f"{srv.url}/nix/signed", path,
                          netrc=writer.netrc("127.0.0.1", token)).returncode == 0
    key = public_key(srv.state, "signed")

    good = _mirror(srv, token, "signed", [dep, path], tmp_path / "good")
    bad = _mirror(srv, token, "signed", [dep, path], tmp_path / "bad", tamper=path)
    refused = Nix(tmp_path / "r1").substitute(bad, key, path)
    assert refused.returncode != 0
    assert "is not signed by any of the keys" in refused.stderr
    accepted = Nix(tmp_path / "r2")
    assert accepted.substitute(good, key, path).returncode == 0
    assert accepted.read(path) == writer.read(path)


def test_key_rotation_signs_with_the_new_key_at_once(srv: Server, tmp_path: Path) -> None:
    token = srv.token("--write", "rotating")
    url = f"{srv.url}/nix/rotating"
    writer = Nix(tmp_path / "writer")
    _, path = writer.build_chain("rotating")
    assert writer.copy_to(url, path, netrc=writer.netrc("127.0.0.1", token)).returncode == 0
    old = public_key(srv.state, "rotating")
    rotated = stickyci("nix", "key", "rotate", "--state-dir", str(srv.state), "rotating")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old and new.startswith("rotating-2:") and old.startswith("rotating-1:")
    stale = Nix(tmp_path / "stale")
    assert stale.substitute(url, old, path, stale.netrc("127.0.0.1", token)).returncode != 0
    fresh = Nix(tmp_path / "fresh")
    assert fresh.substitute(url, new, path, fresh.netrc("127.0.0.1", token)).returncode == 0


def test_key_cli_keeps_the_secret_in_a_0600_file_and_prints_only_public_keys(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert "no signing key" in stickyci("nix", "key", "show", "--state-dir", str(state),
                                        "ci").stderr
    made = stickyci("nix", "key", "generate", "--state-dir", str(state), "ci")
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert public.startswith("ci-1:") and len(base64.b64decode(public.split(":")[1])) == 32
    again = stickyci("nix", "key", "generate", "--state-dir", str(state), "ci")
    assert again.stdout.strip() == public  # generate keeps an existing key
    secret_file = state / "nix-keys" / "ci.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip().split(":")[1]
    assert secret not in made.stdout + made.stderr
    bad = stickyci("nix", "key", "generate", "--state-dir", str(state), "../evil")
    assert bad.returncode == 2 and "Nix cache name" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "evil.secret").exists()


def test_a_new_version_of_a_50_mib_path_adds_only_its_changed_chunks(srv: Server,
                                                                      tmp_path: Path) -> None:
    token = srv.token("--write", "dedup*")
    url = f"{srv.url}/nix/dedup?compression=zstd"
    writer = Nix(tmp_path / "writer")
    netrc = writer.netrc("127.0.0.1", token)
    files = random_files(1, 50, MiB)
    v1 = writer.add_tree("big", files)
    v2 = writer.add_tree("big", {**files, "lib/file025.bin": os.urandom(MiB)})
    assert v1 != v2
    store = store_dir(srv)
    before = tree_bytes(store)
    assert writer.copy_to(url, v1, netrc=netrc).returncode == 0
    settled(srv.state)
    first = tree_bytes(store) - before
    assert first > 50 * MiB  # incompressible: the first copy is stored whole
    assert writer.copy_to(url, v2, netrc=netrc).returncode == 0
    settled(srv.state)
    second = tree_bytes(store) - before - first
    assert second < 0.1 * first, f"the second version added {second} bytes of {first}"
    # the same NAR uploaded to another cache: its chunks are there already
    elsewhere = tree_bytes(store)
    assert writer.copy_to(f"{srv.url}/nix/dedup-2?compression=zstd", v1,
                          netrc=netrc).returncode == 0
    settled(srv.state)
    assert tree_bytes(store) - elsewhere < 0.01 * first
    reader = Nix(tmp_path / "reader")
    got = reader.substitute(url.split("?")[0], public_key(srv.state, "dedup"), v2,
                            netrc=reader.netrc("127.0.0.1", token))
    assert got.returncode == 0, got.stderr
    assert reader.read(v2 + "/lib/file025.bin") == writer.read(v2 + "/lib/file025.bin")


def test_nix32_is_the_base_32_nix_prints(tmp_path: Path) -> None:
    for data in (b"", b"hello", os.urandom(1000)):
        (tmp_path / "f").write_bytes(data)
        printed = subprocess.run(["nix-hash", "--type", "sha256", "--flat", "--base32",
                                  str(tmp_path / "f")], capture_output=True, text=True,
                                 check=True).stdout.strip()
        digest = hashlib.sha256(data).digest()
        assert nix32(digest) == printed and parse_nix32(printed, 32) == digest


def test_gc_keeps_what_narinfos_reach_and_frees_evicted_nars(tmp_path: Path) -> None:
    with start_server(tmp_path / "srv", args=["--max-size", "1M"]) as s:
        token = s.token("--write", "lru")
        url = f"{s.url}/nix/lru?compression=none"
        writer = Nix(tmp_path / "writer")
        netrc = writer.netrc("127.0.0.1", token)
        old = writer.add_tree("old", random_files(2, 1, 600 << 10))
        assert writer.copy_to(url, old, netrc=netrc).returncode == 0
        settled(s.state)
        collected = stickyci("disk", "gc", "--grace", "0s", "--json", "--store", s.store_url)
        assert collected.returncode == 0, collected.stderr
        key = public_key(s.state, "lru")
        kept = Nix(tmp_path / "kept")
        assert kept.substitute(s.url + "/nix/lru", key, old,
                               kept.netrc("127.0.0.1", token)).returncode == 0

        new = writer.add_tree("new", random_files(3, 1, 600 << 10))
        assert writer.copy_to(url, new, netrc=netrc).returncode == 0
        settled(s.state)
        client = httpx2.Client(base_url=f"{s.url}/nix/lru", headers=basic(token))
        assert client.get(f"/{Path(old).name[:32]}.narinfo").status_code == 404
        assert metric(s.url, "stickyci_evictions_total") >= 1
        before = tree_bytes(store_dir(s))
        assert stickyci("disk", "gc", "--grace", "0s", "--store", s.store_url).returncode == 0
        assert before - tree_bytes(store_dir(s)) > 500 << 10
        reader = Nix(tmp_path / "reader")
        assert reader.substitute(s.url + "/nix/lru", key, new,
                                 reader.netrc("127.0.0.1", token)).returncode == 0
