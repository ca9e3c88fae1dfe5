"""Attacks on the GitHub Actions cache service of ``stickyci serve``, each performed for real.

A runner's job runs untrusted code with the runner's ``ACTIONS_RUNTIME_TOKEN``, and the signed
URLs the service hands out travel in logs. These tests speak the protocol with a plain HTTP
client against a real server (``--max-body 1M``, so limits are cheap to reach): forged,
expired and re-targeted signed URLs, oversized bodies, block lists naming another upload's
blocks, finalizing another token's upload or with a wrong size, and archives that do not
decompress or decompress too far.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
import zstandard
from server import Server, start_server, unique

from stickyci.disks import gc
from stickyci.server.gha import tar_pieces
from stickyci.store import LocalBackend

SERVICE = "/twirp/github.actions.results.api.v1.CacheService"
VERSION = "a" * 64
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("gha-attacks"), args=["--max-body", "1M"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def alice(server: Server) -> str:
    return server.token("--write", "*", "--name", "alice")


@pytest.fixture(scope="module")
def mallory(server: Server) -> str:
    return server.token("--read", "*", "--write", "pr-*", "--name", "mallory")


def twirp(server: Server, token: str | None, method: str, **body: object) -> httpx2.Response:
    """One Twirp JSON call."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.post(f"{server.url}{SERVICE}/{method}", json=body, headers=headers, timeout=30)


def create(server: Server, token: str, key: str) -> str:
    """Create an entry; its signed upload URL."""
    r = twirp(server, token, "CreateCacheEntry", key=key, version=VERSION)
    assert r.status_code == 200 and r.json()["ok"], r.text
    return str(r.json()["signedUploadUrl"])


def finalize(server: Server, token: str, key: str, size: int) -> httpx2.Response:
    return twirp(server, token, "FinalizeCacheEntryUpload", key=key, version=VERSION,
                 sizeBytes=str(size))


def lookup(server: Server, token: str, key: str) -> dict[str, object]:
    r = twirp(server, token, "GetCacheEntryDownloadURL", key=key, restoreKeys=[],
              version=VERSION)
    assert r.status_code == 200, r.text
    return dict(r.json())


def twirp_error(r: httpx2.Response, status: int, code: str) -> str:
    """Check a Twirp JSON error (the client retries anything else); its message."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == code, body
    assert "\n" not in body["msg"]
    return str(body["msg"])


def with_query(url: str, **changes: str) -> str:
    """``url`` with some of its query parameters replaced."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return f"{parts.scheme}://{parts.netloc}{parts.path}?" + "&".join(
        f"{k}={v}" for k, v in query.items())


def zstd_tar(files: dict[str, bytes]) -> bytes:
    """A tar of ``files``, zstd-compressed, as the client makes one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(buf.getvalue())


def save_archive(server: Server, token: str, key: str, archive: bytes) -> None:
    url = create(server, token, key)
    assert httpx2.put(url, content=archive).status_code == 201
    r = finalize(server, token, key, len(archive))
    assert r.status_code == 200 and r.json()["ok"], r.text


def download(server: Server, token: str, key: str) -> bytes:
    found = lookup(server, token, key)
    assert found["ok"] and found["matchedKey"] == key, found
    r = httpx2.get(str(found["signedDownloadUrl"]), timeout=30)
    assert r.status_code == 200
    return r.content


# -- the Twirp side -----------------------------------------------------------------------


def test_twirp_failures_are_twirp_json(server: Server, alice: str) -> None:
    msg = twirp_error(twirp(server, None, "CreateCacheEntry", key="k", version=VERSION),
                      401, "unauthenticated")
    assert "token" in msg
    twirp_error(twirp(server, "sci_0_x", "CreateCacheEntry", key="k", version=VERSION),
                401, "unauthenticated")
    twirp_error(twirp(server, alice, "DeleteCacheEntry", key="k"), 404, "not_found")
    twirp_error(twirp(server, alice, "CreateCacheEntry", key="a,b", version=VERSION),
                400, "invalid_argument")
    twirp_error(twirp(server, alice, "CreateCacheEntry", key="k" * 513, version=VERSION),
                400, "invalid_argument")
    twirp_error(twirp(server, alice, "GetCacheEntryDownloadURL", key="k", version=VERSION,
                      restoreKeys=[f"r{i}" for i in range(10)]), 400, "invalid_argument")
    r = httpx2.post(f"{server.url}{SERVICE}/CreateCacheEntry", content=b"{not json",
                   headers={"authorization": f"Bearer {alice}"})
    twirp_error(r, 400, "invalid_argument")
    r = httpx2.post(f"{server.url}{SERVICE}/CreateCacheEntry", content=b" " * (65 * KiB),
                   headers={"authorization": f"Bearer {alice}"})
    twirp_error(r, 400, "invalid_argument")


def test_write_outside_the_token_scope_is_denied(server: Server, alice: str,
                                                 mallory: str) -> None:
    key = unique("main")
    r = twirp(server, mallory, "CreateCacheEntry", key=key, version=VERSION)
    assert r.status_code == 200 and r.json()["ok"] is False
    assert r.json()["message"].startswith("cache write denied:")
    # Nor can it finalize into the key by skipping the creation.
    twirp_error(finalize(server, mallory, key, 10), 403, "permission_denied")
    assert lookup(server, alice, key) == {"ok": False}


def test_finalize_of_another_tokens_upload_is_refused(server: Server, mallory: str) -> None:
    victim = server.token("--write", "pr-*", "--name", "victim")
    key = unique("pr-shared")
    url = create(server, victim, key)
    archive = zstd_tar({"f": b"the victim's"})
    assert httpx2.put(url, content=archive).status_code == 201
    # Same scope, another token: it may not finalize (publish) the victim's upload...
    twirp_error(finalize(server, mallory, key, len(archive)), 404, "not_found")
    # ...nor start a competing one for the same key while it is in progress.
    r = twirp(server, mallory, "CreateCacheEntry", key=key, version=VERSION)
    assert r.json()["ok"] is False
    assert finalize(server, victim, key, len(archive)).json()["ok"] is True
    assert untar(download(server, mallory, key)) == untar(archive)


def test_finalize_with_a_wrong_size_is_refused(server: Server, alice: str) -> None:
    key = unique("size")
    url = create(server, alice, key)
    archive = zstd_tar({"f": os.urandom(1000)})
    assert httpx2.put(url, content=archive).status_code == 201
    for wrong in (len(archive) + 1, len(archive) - 1, 0):
        msg = twirp_error(finalize(server, alice, key, wrong), 400, "invalid_argument")
        assert f"{len(archive)} were uploaded" in msg
        assert lookup(server, alice, key) == {"ok": False}
    assert finalize(server, alice, key, len(archive)).json()["ok"] is True
    # Finalized: the upload URL is spent, and the entry can never be replaced.
    assert httpx2.put(url, content=b"replacement").status_code == 404
    assert twirp(server, alice, "CreateCacheEntry", key=key, version=VERSION).json()["ok"] is False


def test_finalize_before_any_upload_is_refused(server: Server, alice: str) -> None:
    key = unique("empty")
    create(server, alice, key)
    msg = twirp_error(finalize(server, alice, key, 0), 400, "invalid_argument")
    assert "never uploaded" in msg


# -- signed URLs --------------------------------------------------------------------------


def test_forged_and_expired_urls_are_refused(server: Server, alice: str) -> None:
    key = unique("forge")
    url = create(server, alice, key)
    q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    sig = q["sig"]
    forged = [with_query(url, sig=("0" if sig[0] != "0" else "1") + sig[1:]),
              with_query(url, exp=str(int(q["exp"]) + 3600)),  # a longer life, same sig
              url.split("?")[0],
              with_query(url, sig="")]
    for bad in forged:
        r = httpx2.put(bad, content=b"x")
        assert r.status_code == 401, (bad, r.text)
    # Signed with the server's own key, but expired: a URL that leaked into an old log.
    key_hex = (server.state / "gha.key").read_text().strip()
    entry_id = int(urlsplit(url).path.rsplit("/", 1)[1])
    past = int(time.time()) - 1
    old_sig = hmac.new(bytes.fromhex(key_hex), f"upload\n{entry_id}\n{past}".encode(),
                       hashlib.sha256).hexdigest()
    r = httpx2.put(with_query(url, exp=str(past), sig=old_sig), content=b"x")
    assert r.status_code == 401 and "expired" in r.json()["error"]
    # None of them staged anything.
    msg = twirp_error(finalize(server, alice, key, 1), 400, "invalid_argument")
    assert "never uploaded" in msg


def test_a_url_works_only_for_its_entry_and_operation(server: Server, alice: str,
                                                      mallory: str) -> None:
    key, pr_key = unique("main"), unique("pr-other")
    victim_url = create(server, alice, key)
    own_url = create(server, mallory, pr_key)
    victim_path = urlsplit(victim_url).path
    own_query = urlsplit(own_url).query
    # Its own signature on the victim's entry id.
    r = httpx2.put(f"{server.url}{victim_path}?{own_query}", content=b"poison")
    assert r.status_code == 401
    # Its own entry's upload signature as a download, and a download URL as an upload.
    archive = zstd_tar({"f": b"mallory's own"})
    assert httpx2.put(own_url, content=archive).status_code == 201
    assert finalize(server, mallory, pr_key, len(archive)).json()["ok"]
    own_id = urlsplit(own_url).path.rsplit("/", 1)[1]
    assert httpx2.get(f"{server.url}/gha/download/{own_id}?{own_query}").status_code == 401
    found = lookup(server, mallory, pr_key)
    dl = urlsplit(str(found["signedDownloadUrl"]))
    victim_id = victim_path.rsplit("/", 1)[1]
    assert httpx2.put(f"{server.url}/gha/upload/{victim_id}?{dl.query}",
                     content=b"poison").status_code == 401
    # The victim's upload is untouched and still completes.
    good = zstd_tar({"f": b"alice's"})
    assert httpx2.put(victim_url, content=good).status_code == 201
    assert finalize(server, alice, key, len(good)).json()["ok"]
    assert untar(download(server, alice, key)) == untar(good)


# -- bodies and blocks --------------------------------------------------------------------


def test_oversized_bodies_are_refused(server: Server, alice: str) -> None:
    key = unique("big")
    url = create(server, alice, key)
    r = httpx2.put(url, content=os.urandom(MiB + 1))
    assert r.status_code == 413
    # Undeclared length (chunked): cut off as it passes the limit.
    r = httpx2.put(url, content=iter([os.urandom(512 * KiB)] * 3))
    assert r.status_code == 413
    # Blocks: each under the limit, together over it.
    block = f"{with_query(url, comp='block')}&blockid="
    assert httpx2.put(block + "QUFBQQ==", content=os.urandom(600 * KiB)).status_code == 201
    r = httpx2.put(block + "QkJCQg==", content=os.urandom(600 * KiB))
    assert r.status_code == 413
    assert "never uploaded" in twirp_error(finalize(server, alice, key, 600 * KiB), 400,
                                           "invalid_argument")


def test_block_list_cannot_take_another_uploads_blocks(server: Server, alice: str,
                                                       mallory: str) -> None:
    victim_url = create(server, alice, unique("main"))
    secret = os.urandom(1000)
    assert httpx2.put(f"{with_query(victim_url, comp='block')}&blockid=QUFBQQ==",
                     content=secret).status_code == 201
    pr_key = unique("pr-steal")
    own_url = create(server, mallory, pr_key)
    blocklist = b'<?xml version="1.0"?><BlockList><Latest>QUFBQQ==</Latest></BlockList>'
    r = httpx2.put(with_query(own_url, comp="blocklist"), content=blocklist)
    assert r.status_code == 400 and "was not uploaded for this entry" in r.json()["error"]
    assert "never uploaded" in twirp_error(finalize(server, mallory, pr_key, len(secret)),
                                           400, "invalid_argument")
    # Block ids are parsed, never paths; block lists carry no DOCTYPE or entities.
    for bad in ("../../gha.key", "Li4vLi4v%2F", ""):
        r = httpx2.put(f"{with_query(own_url, comp='block')}&blockid={bad}", content=b"x")
        assert r.status_code == 400, bad
    bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]>'
            b"<BlockList><Latest>&a;</Latest></BlockList>")
    assert httpx2.put(with_query(own_url, comp="blocklist"), content=bomb).status_code == 400
    assert httpx2.put(with_query(own_url, comp="appendblock"), content=b"x").status_code == 400


def test_blocks_assemble_in_the_listed_order(server: Server, alice: str) -> None:
    key = unique("blocks")
    url = create(server, alice, key)
    archive = zstd_tar({"a": os.urandom(300 * KiB), "b": b"tail"})
    parts = [archive[: len(archive) // 2], archive[len(archive) // 2 :]]
    ids = ["MDAwMQ==", "MDAwMg=="]
    for block_id, part in reversed(list(zip(ids, parts, strict=True))):
        r = httpx2.put(f"{with_query(url, comp='block')}&blockid={block_id}", content=part)
        assert r.status_code == 201
    listing = "".join(f"<Latest>{i}</Latest>" for i in ids)
    r = httpx2.put(with_query(url, comp="blocklist"),
                  content=f"<BlockList>{listing}</BlockList>".encode())
    assert r.status_code == 201
    assert finalize(server, alice, key, len(archive)).json()["ok"]
    assert untar(download(server, alice, key)) == untar(archive)


# -- what the server stores ---------------------------------------------------------------


def test_undecodable_archives_are_stored_as_uploaded(server: Server, alice: str) -> None:
    # zstd's magic, then garbage: the client would fail to extract it, and so gets it back
    # byte for byte, as it would from GitHub.
    garbage = b"\x28\xb5\x2f\xfd" + os.urandom(5000)
    key = unique("garbage")
    save_archive(server, alice, key, garbage)
    assert download(server, alice, key) == garbage
    # A bomb: 64 MiB of zeros in a few KiB, past what the server decompresses (16x its
    # 1 MiB --max-body). Stored as uploaded; it costs what its upload cost.
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * MiB))
    assert len(bomb) < MiB
    key = unique("bomb")
    save_archive(server, alice, key, bomb)
    found = lookup(server, alice, key)
    r = httpx2.get(str(found["signedDownloadUrl"]))
    assert r.content == bomb and r.headers["content-length"] == str(len(bomb))


def untar(archive: bytes) -> bytes:
    """The tar inside a zstd archive: a download re-compresses the tar the server stored, so
    downloads are compared to uploads after decompressing."""
    return zstandard.ZstdDecompressor().decompressobj().decompress(archive)


def test_a_download_decompresses_to_the_uploaded_tar(server: Server, alice: str) -> None:
    files = {f"f{i}": os.urandom(200 * KiB) + bytes(100 * KiB) for i in range(3)}
    archive = zstd_tar(files)
    key = unique("tar")
    save_archive(server, alice, key, archive)
    got = download(server, alice, key)
    assert got != archive  # re-compressed, not the upload kept whole
    assert untar(got) == untar(archive)
    with tarfile.open(fileobj=io.BytesIO(untar(got))) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                } == files


# -- what reads the store's and the client's bytes ------------------------------------------


def test_gc_takes_root_records_as_untrusted(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "store")
    backend.put("roots/gha.1", b"not json")
    backend.put("roots/gha.2", b'{"snapshot": "../../etc"}')
    report = gc(backend, grace=0)
    assert set(report.skipped) == {"roots/gha.1", "roots/gha.2"}


def _tar(fmt: int, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("stream", [
    _tar(tarfile.PAX_FORMAT, {"a": os.urandom(3000), "b" * 200: b"long name", "c": b""}),
    _tar(tarfile.GNU_FORMAT, {"d" * 150: os.urandom(700)}),
    _tar(tarfile.PAX_FORMAT, {"a": b"x" * 1000})[:1300],  # cut short in a member's data
    _tar(tarfile.PAX_FORMAT, {"a": b"x"})[:700],  # cut short in a header
    os.urandom(4096),  # not a tar
    b"",
    # A pax header that claims a size far past the stream, then nothing.
    _tar(tarfile.PAX_FORMAT, {"a": b"y" * 10})[:512] + b"30 size=99999999999999999999\n",
], ids=["pax", "gnu", "short-data", "short-header", "random", "empty", "pax-lies"])
def test_tar_cuts_never_lose_or_reorder_bytes(stream: bytes) -> None:
    pieces = list(tar_pieces(io.BytesIO(stream)))
    assert b"".join(p for p in pieces if p is not None) == stream


def test_tar_cuts_separate_headers_from_data() -> None:
    # Same contents, different header times (a restore changes every ctime): the data pieces
    # are the same bytes, so they deduplicate.
    files = {"a": os.urandom(5000), "b": os.urandom(70000)}
    one = _tar(tarfile.PAX_FORMAT, files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_999
            info.pax_headers = {"ctime": "1700001234.5"}
            tar.addfile(info, io.BytesIO(data))
    two = buf.getvalue()

    def data_pieces(stream: bytes) -> list[bytes]:
        out, cur = [], b""
        for p in tar_pieces(io.BytesIO(stream)):
            if p is None:
                out.append(cur)
                cur = b""
            else:
                cur += p
        return [piece for piece in out if piece.startswith((files["a"][:16], files["b"][:16]))]

    assert data_pieces(one) == data_pieces(two) and len(data_pieces(one)) == 2
