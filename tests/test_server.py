"""``stickyci serve``: the store API endpoint by endpoint, the auth matrix, and the CLI through it.

Every test talks to a real server subprocess (``server.py``) over real HTTP; the CLI runs as
real processes with ``STICKYCI_STORE=http://…`` and ``STICKYCI_TOKEN``. Most tests share one
server per module (a start costs most of a second) and keep apart by their disk keys; tests
that restart a server or need its flags start their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from helpers import Env, commit_tree, one_line_error, read_tree
from prometheus_client.parser import text_string_to_metric_families
from server import Server, blob, error, pack, remote, start_server, store_dir, unique

from stickyci.digest import Digest
from stickyci.disks.refs import DiskRef, Generation
from stickyci.server.state import STREAM_CHUNK
from stickyci.snapshot import save_manifest
from stickyci.snapshot.model import Manifest
from stickyci.store import ObjectStore
from stickyci.store import protocol as p
from stickyci.store.http import HttpBackend
from stickyci.store.objects import encode_index

MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------------


EMPTY_TREE = Manifest().encode()
EMPTY_SNAPSHOT = Digest.of(EMPTY_TREE)


def disk_ref(key: str, gens: int = 1, last_used: float | None = None) -> bytes:
    """A well-formed ref of ``key`` with generations 1..gens of the empty tree (the server
    accepts a ref only when its snapshots are in the store: see ``stored_empty_tree``)."""
    now = time.time()
    return DiskRef(key, now, now if last_used is None else last_used, [
        Generation(g, EMPTY_SNAPSHOT, now, 1, 1, 1, "test:1")
        for g in range(1, gens + 1)]).encode()


def store_empty_tree(server: Server) -> None:
    """Store the empty tree's manifest, the snapshot ``disk_ref`` names, as a commit would."""
    store = ObjectStore(HttpBackend(server.url, server.admin), load_index=False)
    save_manifest(store, Manifest())


@pytest.fixture(autouse=True)
def stored_empty_tree(request: pytest.FixtureRequest) -> None:
    if "srv" in request.fixturenames:
        store_empty_tree(request.getfixturevalue("srv"))


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, scraped now."""
    text = httpx2.get(f"{server.url}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# --- blobs: GET, HEAD, PUT, DELETE ---------------------------------------------------------------

def test_get_whole_and_ranges(srv: Server) -> None:
    data = os.urandom(100_000)
    name = pack(data)
    c = srv.client()
    assert c.put(blob(name), content=data).status_code == 204
    whole = c.get(blob(name))
    assert whole.status_code == 200 and whole.content == data
    ranges = {"bytes=1000-1999": data[1000:2000], "bytes=99990-": data[99990:],
              "bytes=99990-200000": data[99990:], "bytes=0-0": data[:1]}
    for header, want in ranges.items():
        r = c.get(blob(name), headers={"range": header})
        assert r.status_code == 206 and r.content == want, header
        start = header.removeprefix("bytes=").split("-")[0]
        assert r.headers["content-range"] == f"bytes {start}-{int(start) + len(want) - 1}/*"
    for bad in ("bytes=5-1", "bytes=0-1,5-9", "items=0-9", "bytes=-5"):
        r = c.get(blob(name), headers={"range": bad})
        assert r.status_code == 400 and "Range" in error(r).error, bad


def test_head_gives_size_and_mtime_or_404(srv: Server) -> None:
    data = os.urandom(4321)
    name = pack(data)
    c = srv.client()
    c.put(blob(name), content=data)
    r = c.head(blob(name))
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(data)
    assert float(r.headers[p.MTIME_HEADER]) == (store_dir(srv) / name).stat().st_mtime
    missing = c.head(blob(pack(b"never stored")))
    assert missing.status_code == 404 and missing.content == b""


def test_put_of_a_pack_that_does_not_hash_to_its_name_is_refused(srv: Server) -> None:
    c = srv.client()
    name = pack(b"the real content")
    r = c.put(blob(name), content=b"other content")
    assert r.status_code == 400
    assert error(r).kind == "IntegrityError" and "does not hash" in error(r).error
    # A compare-and-swap is no way around it: packs take no conditions at all.
    r = c.put(blob(name), content=b"other content", headers={"if-none-match": "*"})
    assert r.status_code == 400 and "immutable" in error(r).error
    assert c.head(blob(name)).status_code == 404
    assert not (store_dir(srv) / name).exists()


def test_put_of_an_index_must_pass_its_checksum(srv: Server) -> None:
    c = srv.client()
    good = encode_index([(Digest.of(b"a"), 0, 10), (Digest.of(b"b"), 10, 5)])
    name = f"index/{Digest.of(b'some pack').hex}"
    damaged = good[:-1] + bytes([good[-1] ^ 1])
    for bad in (damaged, b"", b"SCX1", good[:40]):
        r = c.put(blob(name), content=bad)
        assert r.status_code == 400 and error(r).kind == "IntegrityError"
        assert c.head(blob(name)).status_code == 404
    assert c.put(blob(name), content=good).status_code == 204
    assert c.get(blob(name)).content == good


def test_put_of_an_existing_pack_is_a_no_op(srv: Server) -> None:
    data = os.urandom(50_000)
    name = pack(data)
    c = srv.client()
    assert c.put(blob(name), content=data).status_code == 204
    before = os.stat(store_dir(srv) / name)
    assert c.put(blob(name), content=data).status_code == 204
    after = os.stat(store_dir(srv) / name)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


@pytest.mark.parametrize("ns", ["tmp", "roots"])
def test_the_servers_own_namespaces_are_not_writable(srv: Server, ns: str) -> None:
    r = srv.client().put(blob(f"{ns}/x"), content=b"x")
    assert r.status_code == 400 and ns in error(r).error
    assert not (store_dir(srv) / ns / "x").exists()


def test_delete(srv: Server) -> None:
    c = srv.client()
    data = os.urandom(100)
    key = unique("del")
    assert c.put(blob(pack(data)), content=data).status_code == 204
    assert c.put(blob(f"refs/{key}"), content=disk_ref(key)).status_code == 204
    for name in (pack(data), f"refs/{key}"):
        # Deleting what is not there succeeds too: first make sure the PUT really stored it.
        assert c.head(blob(name)).status_code == 200 and (store_dir(srv) / name).is_file()
        assert c.delete(blob(name)).status_code == 204
        assert c.head(blob(name)).status_code == 404
        assert not (store_dir(srv) / name).exists()
        assert c.delete(blob(name)).status_code == 204  # absent is fine


# --- versioned reads and compare-and-swap -------------------------------------------------------

def test_versioned_get_gives_the_etag(srv: Server) -> None:
    c = srv.client()
    key = unique("ver")
    assert c.get(f"{p.PREFIX}/versioned/refs/{key}").status_code == 404
    v1 = disk_ref(key, 1)
    c.put(blob(f"refs/{key}"), content=v1)
    first = c.get(f"{p.PREFIX}/versioned/refs/{key}")
    assert first.status_code == 200 and first.content == v1 and first.headers["etag"]
    assert c.get(f"{p.PREFIX}/versioned/refs/{key}").headers["etag"] == first.headers["etag"]
    c.put(blob(f"refs/{key}"), content=disk_ref(key, 2))
    second = c.get(f"{p.PREFIX}/versioned/refs/{key}")
    assert second.headers["etag"] != first.headers["etag"]
    assert DiskRef.decode(second.content).latest.gen == 2  # type: ignore[union-attr]


def test_compare_and_swap(srv: Server) -> None:
    c = srv.client()
    key = unique("cas")
    name = blob(f"refs/{key}")

    def etag() -> str:
        return c.get(f"{p.PREFIX}/versioned/refs/{key}").headers["etag"]

    assert c.put(name, content=disk_ref(key, 1), headers={"if-none-match": "*"}).status_code == 204
    lost = c.put(name, content=disk_ref(key, 5), headers={"if-none-match": "*"})
    assert lost.status_code == 409
    body = error(lost)
    assert (body.kind, body.etag, body.generation) == ("ConflictError", etag(), 1)

    v1 = etag()
    assert c.put(name, content=disk_ref(key, 2), headers={"if-match": v1}).status_code == 204
    stale = c.put(name, content=disk_ref(key, 3), headers={"if-match": v1})
    assert stale.status_code == 409
    assert (error(stale).etag, error(stale).generation) == (etag(), 2)
    assert DiskRef.decode(c.get(name).content).latest.gen == 2  # type: ignore[union-attr]

    # a lost race on a ref that is not a disk's JSON still answers 409, without a generation
    odd = unique("odd")
    c.put(blob(f"refs/{odd}"), content=b"5")
    r = c.put(blob(f"refs/{odd}"), content=b"6", headers={"if-match": "stale"})
    assert r.status_code == 409 and error(r).generation is None and error(r).etag
    c.delete(blob(f"refs/{odd}"))  # a ref that is not JSON would break the disk listing


# --- listings, the missing batch, disks ---------------------------------------------------------

def test_list_filters_refs_by_the_tokens_read_patterns(srv: Server) -> None:
    c = srv.client()
    team = unique("lst")
    keys = [f"{team}-a", f"{team}-b", f"{team}x-c"]
    for key in keys:
        c.put(blob(f"refs/{key}"), content=disk_ref(key))
    data = os.urandom(10)
    c.put(blob(pack(data)), content=data)

    def listing(token: str | None, ns: str) -> httpx2.Response:
        return srv.client(token).get(f"{p.PREFIX}/list/{ns}")

    everything = p.ListResponse.model_validate_json(listing(None, "refs").content).names
    assert {f"refs/{k}" for k in keys} <= set(everything)
    reader = srv.token("--read", f"{team}-*")
    seen = p.ListResponse.model_validate_json(listing(reader, "refs").content).names
    assert sorted(seen) == [f"refs/{team}-a", f"refs/{team}-b"]
    packs = p.ListResponse.model_validate_json(listing(reader, "packs").content).names
    assert pack(data) in packs  # content carries no key: any read scope lists it
    assert listing(reader, "tmp").status_code == 403  # unfinished writes are gc's (admin)
    assert listing(None, "tmp").status_code == 200
    for bad in ("nope", "Refs"):
        assert listing(None, bad).status_code == 400


def test_missing_answers_a_batch(srv: Server) -> None:
    c = srv.client()
    present = [os.urandom(20) for _ in range(3)]
    for data in present:
        c.put(blob(pack(data)), content=data)
    absent = [pack(b"absent %d" % i) for i in range(3)] + [f"index/{Digest.of(b'x').hex}"]
    names = [pack(present[0]), absent[0], pack(present[1]), absent[1], absent[2],
             pack(present[2]), absent[3]]
    r = c.post(f"{p.PREFIX}/missing", content=p.MissingRequest(names=names).model_dump_json())
    assert r.status_code == 200
    assert p.MissingResponse.model_validate_json(r.content).missing == absent

    full = [pack(b"%d" % i) for i in range(p.MAX_BATCH)]
    r = c.post(f"{p.PREFIX}/missing", json={"names": full})
    assert r.status_code == 200 and len(r.json()["missing"]) == p.MAX_BATCH
    r = c.post(f"{p.PREFIX}/missing", json={"names": [*full, pack(b"one too many")]})
    assert r.status_code == 400 and "names" in error(r).error
    # the client splits a bigger question into batches the server takes
    asked = [*full, *names]
    assert HttpBackend(srv.url, srv.admin).missing(asked) == [*full, *absent]
    for names in (["refs/main"], [pack(b"x"), "tmp/x"], ["packs/../refs/x"]):
        r = c.post(f"{p.PREFIX}/missing", json={"names": names})
        assert r.status_code == 400 and error(r).kind == "UsageError", names
    for body in (b"not json", b'{"names": "packs/x"}', b"{}"):
        assert c.post(f"{p.PREFIX}/missing", content=body).status_code == 400


def test_disks_are_listed_and_shown_within_the_tokens_scope(srv: Server) -> None:
    c = srv.client()
    team = unique("dsk")
    ours, theirs = [f"{team}-a", f"{team}-b"], unique("other")
    for key in [*ours, theirs]:
        c.put(blob(f"refs/{key}"), content=disk_ref(key, 2))
    reader = srv.client(srv.token("--read", f"{team}-*"))

    listed = p.DisksResponse.model_validate_json(reader.get(f"{p.PREFIX}/disks").content).disks
    assert sorted(d["key"] for d in listed) == ours
    assert all(d["generation"] == 2 for d in listed)
    everyone = c.get(f"{p.PREFIX}/disks").json()["disks"]
    assert {*ours, theirs} <= {d["key"] for d in everyone}

    shown = reader.get(f"{p.PREFIX}/disks/{ours[0]}")
    assert shown.status_code == 200
    assert [g["gen"] for g in shown.json()["generations"]] == [1, 2]
    hidden = reader.get(f"{p.PREFIX}/disks/{theirs}")
    assert hidden.status_code == 403 and error(hidden).kind == "Forbidden"
    assert reader.get(f"{p.PREFIX}/disks/{team}-nope").status_code == 404
    assert c.get(f"{p.PREFIX}/disks/-bad-key").status_code == 400


def test_evict_is_admin_only_and_removes_stale_disks(srv: Server) -> None:
    c = srv.client()
    stale, fresh = unique("evs"), unique("evf")
    c.put(blob(f"refs/{stale}"), content=disk_ref(stale, last_used=time.time() - 7200))
    c.put(blob(f"refs/{fresh}"), content=disk_ref(fresh))
    writer = srv.client(srv.token("--read", "*", "--write", "*", "--delete", "*"))
    denied = writer.post(f"{p.PREFIX}/evict", json={"ttl": 3600})
    assert denied.status_code == 403 and "eviction" in error(denied).error

    before = metric(srv, "stickyci_evictions_total", kind="disk")
    dry = c.post(f"{p.PREFIX}/evict", json={"ttl": 3600, "dry_run": True})
    assert dry.status_code == 200
    assert stale in dry.json()["result"]["evicted"] and fresh not in dry.json()["result"]["evicted"]
    assert c.head(blob(f"refs/{stale}")).status_code == 200

    done = p.EvictResponse.model_validate_json(
        c.post(f"{p.PREFIX}/evict", json={"ttl": 3600}).content).result
    assert stale in done["evicted"] and fresh not in done["evicted"]
    assert c.head(blob(f"refs/{stale}")).status_code == 404
    assert c.head(blob(f"refs/{fresh}")).status_code == 200
    after = metric(srv, "stickyci_evictions_total", kind="disk")
    assert after - before == len(done["evicted"]) >= 1
    for body in ({"ttl": 0}, {"ttl": -1}, {}, {"ttl": "soon"}):
        assert c.post(f"{p.PREFIX}/evict", json=body).status_code == 400, body


# --- operations --------------------------------------------------------------------------------

def test_healthz_needs_no_token_and_names_no_path(srv: Server) -> None:
    r = httpx2.get(f"{srv.url}/healthz")
    assert r.status_code == 200
    assert p.Health.model_validate_json(r.content) == p.Health(status="ok", store="file")
    assert str(store_dir(srv)) not in r.text


def test_metrics_count_requests_and_bytes(srv: Server) -> None:
    c = srv.client()
    data = os.urandom(123_457)
    name = pack(data)

    def snapshot() -> tuple[float, ...]:
        return (metric(srv, "stickyci_requests_total", route="blobs", method="PUT", status="204"),
                metric(srv, "stickyci_requests_total", route="blobs", method="GET", status="404"),
                metric(srv, "stickyci_bytes_in_total", route="blobs"),
                metric(srv, "stickyci_bytes_out_total", route="blobs"),
                metric(srv, "stickyci_request_seconds_count", route="blobs"))

    before = snapshot()
    assert c.put(blob(name), content=data).status_code == 204
    assert c.get(blob(name)).content == data
    assert c.get(blob(name), headers={"range": "bytes=0-99"}).status_code == 206
    assert c.get(blob(pack(b"nothing"))).status_code == 404
    # a HEAD answer carries no body on the wire, found or not, so it sends no bytes
    assert c.head(blob(name)).status_code == 200
    assert c.head(blob(pack(b"nothing"))).status_code == 404
    after = snapshot()
    assert after[0] - before[0] == 1 and after[1] - before[1] == 1
    assert after[2] - before[2] == len(data)
    missing_body = len(c.get(blob(pack(b"nothing"))).content)
    assert after[3] - before[3] == len(data) + 100 + missing_body
    assert after[4] - before[4] == 6


# --- the auth matrix ---------------------------------------------------------------------------

# Each token grants one permission, on the tested key's pattern ("hit") or on another ("miss");
# the admin "miss" is a token with every pattern permission on everything, but not admin.
TOKENS: dict[str, tuple[str, ...]] = {
    "read-hit": ("--read", "am-*"), "read-miss": ("--read", "zz-*"),
    "write-hit": ("--write", "am-*"), "write-miss": ("--write", "zz-*"),
    "delete-hit": ("--delete", "am-*"), "delete-miss": ("--delete", "zz-*"),
    "admin-hit": ("--admin",), "admin-miss": ("--read", "*", "--write", "*", "--delete", "*"),
}
OPS = ("get", "head", "versioned", "list", "show", "touch", "commit", "rm",
       "pack_get", "pack_head", "missing", "pack_put", "pack_rm", "tmp", "evict")
# "list" is whether the key's ref appears in the refs listing; everything else a status.
# A reader may "touch" (move last_used only, as a mount does) but not commit. Delete implies
# read of the same keys: removing a disk reads its ref first.
MATRIX: dict[str, tuple[object, ...]] = {
    #               get  head ver  list   show touch commit rm  pget phead miss pput prm  tmp  evict
    "read-hit":    (200, 200, 200, True,  200, 204, 403, 403, 200, 200, 200, 403, 403, 403, 403),
    "read-miss":   (403, 403, 403, False, 403, 403, 403, 403, 200, 200, 200, 403, 403, 403, 403),
    "write-hit":   (200, 200, 200, True,  200, 204, 204, 403, 200, 200, 200, 204, 403, 403, 403),
    "write-miss":  (403, 403, 403, False, 403, 403, 403, 403, 200, 200, 200, 204, 403, 403, 403),
    "delete-hit":  (200, 200, 200, True,  200, 204, 403, 204, 200, 200, 200, 403, 403, 403, 403),
    "delete-miss": (403, 403, 403, False, 403, 403, 403, 403, 200, 200, 200, 403, 403, 403, 403),
    "admin-hit":   (200, 200, 200, True,  200, 204, 204, 204, 200, 200, 200, 204, 204, 200, 200),
    "admin-miss":  (200, 200, 200, True,  200, 204, 204, 204, 200, 200, 200, 204, 403, 403, 403),
}


def _run_ops(c: httpx2.Client, admin: httpx2.Client, key: str, data: bytes
             ) -> dict[str, httpx2.Response]:
    """Every operation once as ``c``'s token: reads, then writes, then deletes."""
    ref, name = f"refs/{key}", pack(data)

    def etag() -> str:  # the current one: these compare-and-swaps test scopes, not races
        return admin.get(f"{p.PREFIX}/versioned/{ref}").headers["etag"]

    stored = DiskRef.decode(admin.get(blob(ref)).content)
    touched = DiskRef(stored.key, stored.created, time.time(), stored.generations)
    new = os.urandom(64)
    ops: dict[str, Callable[[], httpx2.Response]] = {
        "get": lambda: c.get(blob(ref)),
        "head": lambda: c.head(blob(ref)),
        "versioned": lambda: c.get(f"{p.PREFIX}/versioned/{ref}"),
        "list": lambda: c.get(f"{p.PREFIX}/list/refs"),
        "show": lambda: c.get(f"{p.PREFIX}/disks/{key}"),
        "touch": lambda: c.put(blob(ref), content=touched.encode(), headers={"if-match": etag()}),
        "commit": lambda: c.put(blob(ref), content=disk_ref(key, 2),
                                headers={"if-match": etag()}),
        "rm": lambda: c.delete(blob(ref)),
        "pack_get": lambda: c.get(blob(name)),
        "pack_head": lambda: c.head(blob(name)),
        "missing": lambda: c.post(f"{p.PREFIX}/missing", json={"names": [name]}),
        "pack_put": lambda: c.put(blob(pack(new)), content=new),
        "pack_rm": lambda: c.delete(blob(name)),
        "tmp": lambda: c.get(f"{p.PREFIX}/list/tmp"),
        "evict": lambda: c.post(f"{p.PREFIX}/evict", json={"ttl": 3600, "dry_run": True}),
    }
    order = [op for op in OPS if op not in ("rm", "pack_rm")] + ["rm", "pack_rm"]
    return {op: ops[op]() for op in order}


@pytest.mark.parametrize("who", list(TOKENS))
def test_auth_matrix(srv: Server, who: str) -> None:
    admin = srv.client()
    key = "am-k"
    admin.put(blob(f"refs/{key}"), content=disk_ref(key, 1))
    data = os.urandom(200)
    admin.put(blob(pack(data)), content=data)
    token = srv.token(*TOKENS[who])
    got = _run_ops(srv.client(token), admin, key, data)
    statuses = {op: r.status_code for op, r in got.items()}
    statuses["list"] = (got["list"].status_code == 200
                        and f"refs/{key}" in got["list"].json()["names"])
    assert statuses == dict(zip(OPS, MATRIX[who], strict=True))
    for op, r in got.items():  # a refusal names the token and the permission it lacks
        if r.status_code == 403 and r.request.method != "HEAD":
            body = error(r)
            assert body.kind == "Forbidden" and f"token {token.split('_')[1]} may not" in body.error
        if r.status_code == 403 and op in ("commit", "pack_put"):
            assert "may not write" in error(r).error


# --- tokens: missing, bad, expired, revoked, anonymous -----------------------------------------

def test_a_request_without_a_token_is_challenged(srv: Server) -> None:
    anonymous = srv.client("")
    for r in (anonymous.get(blob("refs/main")), anonymous.get(f"{p.PREFIX}/list/packs"),
              anonymous.put(blob(pack(b"x")), content=b"x"),
              anonymous.post(f"{p.PREFIX}/missing", json={"names": []})):
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert error(r).kind == "AuthError" and "STICKYCI_TOKEN" in error(r).error


def test_a_bad_token_is_401(srv: Server) -> None:
    token = srv.token("--read", "*")
    _, token_id, secret = token.split("_", 2)
    for bad in (f"sci_{token_id}_{secret[:-1]}x", f"sci_{token_id}_", f"sci_00000000_{secret}",
                f"xyz_{token_id}_{secret}", "garbage", secret):
        r = srv.client(bad).get(f"{p.PREFIX}/list/packs")
        assert r.status_code == 401 and "not valid" in error(r).error, bad
        assert secret not in r.text
    for header in (f"Token {token}", "Basic !!!", "Bearer"):
        r = httpx2.get(f"{srv.url}{p.PREFIX}/list/packs", headers={"authorization": header})
        assert r.status_code == 401, header
    # ccache sends the token as the password of HTTP Basic; that form is as good as Bearer
    r = httpx2.get(f"{srv.url}{p.PREFIX}/list/packs", auth=("ci", token))
    assert r.status_code == 200


def _edit_tokens(state: Path, token_id: str, **changes: object) -> None:
    """Change a token's record the way an operator would, with an atomic replace."""
    path = state / "tokens.json"
    doc = json.loads(path.read_text())
    (row,) = [t for t in doc["tokens"] if t["id"] == token_id]
    row.update(changes)
    tmp = path.with_suffix(".edit")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def test_an_expired_token_is_401_naming_when(srv: Server, env: Env) -> None:
    token = srv.token("--read", "*", "--expires", "30d")
    token_id = token.split("_")[1]
    c = srv.client(token)
    assert c.get(f"{p.PREFIX}/list/packs").status_code == 200
    expired = time.time() - 3600
    _edit_tokens(srv.state, token_id, expires=expired)  # the server re-reads the changed file
    r = c.get(f"{p.PREFIX}/list/packs")
    assert r.status_code == 401
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expired))
    assert f"token {token_id} expired at {when}" in error(r).error
    proc = remote(env, srv, token).run("disk", "ls", check=False)
    assert proc.returncode == 10 and "expired" in one_line_error(proc)


def test_a_revoked_token_fails_from_the_next_request(srv: Server) -> None:
    token = srv.token("--write", "rv-*")
    c = srv.client(token)  # one kept-alive connection: auth is per request, not per connection
    assert c.get(f"{p.PREFIX}/list/packs").status_code == 200
    done = subprocess.run([sys.executable, "-m", "stickyci", "token", "revoke",
                           token.split("_")[1], "--state-dir", str(srv.state)],
                          capture_output=True, text=True, check=True)
    assert token.split("_")[1] in done.stdout
    r = c.get(f"{p.PREFIX}/list/packs")
    assert r.status_code == 401 and "not valid" in error(r).error


def test_anonymous_read_lets_reads_through_but_not_writes(tmp_path: Path, env: Env) -> None:
    with start_server(tmp_path / "anon", args=["--anonymous-read"]) as server:
        key = "anon-k"
        files = {"f": b"public"}
        commit_tree(remote(env, server, cache="writer"), key, files, ws="wws")
        nobody = server.client("")
        assert nobody.get(blob(f"refs/{key}")).status_code == 200
        assert nobody.get(f"{p.PREFIX}/list/refs").json()["names"] == [f"refs/{key}"]
        refused = [nobody.put(blob(pack(b"x")), content=b"x"),
                   nobody.delete(blob(f"refs/{key}")),
                   nobody.post(f"{p.PREFIX}/evict", json={"ttl": 1})]
        for r in refused:  # the request lacks a token: 401 asks for one, not a scope (403)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "token" in error(r).error
        assert server.client("sci_0_bad").get(blob(f"refs/{key}")).status_code == 401

        reader = remote(env, server, token="", cache="reader")
        ws = env.root / "rws"
        reader.run("disk", "mount", key, str(ws), "--strategy", "copy")
        assert read_tree(ws) == files
        (ws / "g").write_text("mine")
        proc = reader.run("disk", "commit", str(ws), check=False)
        assert proc.returncode == 10, proc.stderr
        one_line_error(proc)
        assert nobody.head(blob(f"refs/{key}")).status_code == 200


# --- the CLI through the server -----------------------------------------------------------------

def test_a_pull_request_token_reads_main_and_writes_only_its_own(srv: Server, env: Env) -> None:
    admin = remote(env, srv, cache="admin")
    main = {"lib/a.o": os.urandom(5000), "README": b"main\n"}
    commit_tree(admin, "main-x", main, ws="admin-ws")
    before = admin.json("disk", "show", "main-x")
    pr = remote(env, srv, srv.token("--read", "main-*", "--write", "pr-123-*"), cache="pr")

    ws = env.root / "pr-ws"
    mounted = pr.json("disk", "mount", "main-x", str(ws), "--strategy", "copy")
    assert mounted["generation"] == 1 and read_tree(ws) == main
    touched = admin.json("disk", "show", "main-x")  # the mount counts as a use of main-x
    assert touched["last_used"] > before["last_used"]
    assert touched["generations"] == before["generations"]

    (ws / "pr.txt").write_text("from the PR")
    refused = pr.run("disk", "commit", str(ws), check=False)
    assert refused.returncode == 10
    assert "may not write refs/main-x" in one_line_error(refused)
    assert admin.json("disk", "show", "main-x")["generations"] == before["generations"]
    pr.run("disk", "unmount", str(ws))
    removed = pr.run("disk", "rm", "main-x", check=False)
    assert removed.returncode == 10 and "may not delete" in one_line_error(removed)

    ours = commit_tree(pr, "pr-123-x", {"pr.txt": b"from the PR"}, ws="pr-ws2")
    assert ours["committed"] and ours["generation"] == 1
    assert sorted(d["key"] for d in pr.json("disk", "ls")) == ["main-x", "pr-123-x"]


def test_token_secrets_never_reach_the_log_or_the_listing(srv: Server, env: Env) -> None:
    token = srv.token("--write", "sec-*", "--name", "leak-check")
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    mark = srv.log.stat().st_size
    c = srv.client(token)
    c.put(blob("refs/sec-a"), content=disk_ref("sec-a"))
    c.put(blob("refs/other"), content=disk_ref("other"))  # 403
    srv.client(token[:-2]).get(blob("refs/sec-a"))  # 401: a near miss of the secret
    httpx2.get(f"{srv.url}{p.PREFIX}/list/packs", auth=("ci", token))
    remote(env, srv, token).run("disk", "ls")

    log = srv.log.read_text()
    for leaked in (secret, secret[:-2], srv.admin.split("_", 2)[2]):
        assert leaked not in log
    lines = [json.loads(line) for line in log[mark:].splitlines() if line.startswith("{")]
    assert len(lines) >= 5
    assert {line["token"] for line in lines} <= {token_id, None}
    assert [line["status"] for line in lines if line["token"] is None] == [401]

    listed = subprocess.run([sys.executable, "-m", "stickyci", "token", "ls", "--json",
                             "--state-dir", str(srv.state)], capture_output=True, text=True,
                            check=True).stdout
    assert token_id in listed and secret not in listed and "digest" not in listed
    assert secret not in (srv.state / "tokens.json").read_text()  # only its hash is kept


def test_restart_between_commit_and_mount(tmp_path: Path, env: Env) -> None:
    root = tmp_path / "restarted"
    files = {"bin/tool": os.urandom(200_000), "etc/conf": b"a=1\n"}
    with start_server(root) as first:
        port = first.port
        committed = commit_tree(remote(env, first, cache="c1"), "k", files)
    assert first.process.returncode is not None
    with start_server(root, port=port) as second:
        there = remote(env, second, cache="c2")
        ws = env.root / "ws2"
        mounted = there.json("disk", "mount", "k", str(ws), "--strategy", "copy")
        assert (mounted["generation"], mounted["snapshot"]) == (1, committed["snapshot"])
        assert not mounted["base_cached"]
        assert read_tree(ws) == files


def test_a_second_mount_reads_packs_from_the_local_tier(srv: Server, env: Env) -> None:
    key = unique("tier")
    files = {"big.bin": os.urandom(3 * MiB), "small": b"x"}
    packs_before = set(os.listdir(store_dir(srv) / "packs"))
    commit_tree(remote(env, srv, cache="writer"), key, files, ws="wws")
    ours = set(os.listdir(store_dir(srv) / "packs")) - packs_before
    assert ours

    runner = remote(env, srv, cache="a")
    tier = runner.cache / "tier" / f"127.0.0.1_{srv.port}"
    ws = env.root / "ws"

    def pack_bytes_sent() -> float:
        return metric(srv, "stickyci_bytes_out_total", route="blobs")

    sent = pack_bytes_sent()
    runner.run("disk", "mount", key, str(ws), "--strategy", "copy")
    assert pack_bytes_sent() - sent >= 3 * MiB  # a remote hit: the server sent the packs…
    assert ours <= set(os.listdir(tier / "packs"))  # …and the runner kept them
    runner.run("disk", "unmount", str(ws))
    # A cold copy mount restores straight into its path: no base to remove; the tier stays.
    assert not (runner.cache / "bases").exists()

    sent, mark = pack_bytes_sent(), srv.log.stat().st_size
    mounted = runner.json("disk", "mount", key, str(ws), "--strategy", "copy")
    assert not mounted["base_cached"] and read_tree(ws) == files
    assert pack_bytes_sent() == sent
    requests = [json.loads(line) for line in srv.log.read_text()[mark:].splitlines()
                if line.startswith("{")]
    assert requests and not [r for r in requests if r["path"].startswith(blob("packs/"))]


def test_gc_through_the_server_is_for_admins(tmp_path: Path, env: Env) -> None:
    with start_server(tmp_path / "gc") as server:
        admin = remote(env, server, cache="admin")
        commit_tree(admin, "k", {"big": os.urandom(MiB)})
        commit_tree(admin, "other", {"keep": b"kept"}, ws="ws2")
        admin.run("disk", "rm", "k")
        packs = set(os.listdir(store_dir(server) / "packs"))
        writer = remote(env, server, server.token("--read", "*", "--write", "*", "--delete", "*"),
                        cache="writer")
        refused = writer.run("disk", "gc", "--grace", "0s", check=False)
        assert refused.returncode == 10 and "may not" in one_line_error(refused)
        assert set(os.listdir(store_dir(server) / "packs")) == packs
        swept = admin.json("disk", "gc", "--grace", "0s")
        assert swept["packs_deleted"] == 1 and swept["bytes_freed"] >= MiB
        there = remote(env, server, cache="fresh")
        there.run("disk", "mount", "other", str(env.root / "ws3"), "--strategy", "copy")
        assert read_tree(env.root / "ws3") == {"keep": b"kept"}


@pytest.mark.parametrize(("offset", "length"), [(0, None), (7, None), (3, STREAM_CHUNK + 5),
                                                (STREAM_CHUNK - 1, 2)])
def test_blobs_over_a_chunk_stream_whole_and_in_ranges(srv: Server, offset: int,
                                                       length: int | None) -> None:
    data = os.urandom(2 * STREAM_CHUNK + 123)
    name = f"packs/{Digest.of(data).hex}"
    with srv.client() as c:
        assert c.put(blob(name), content=data).status_code == 204
    backend = HttpBackend(srv.url, srv.admin)
    want = data[offset:] if length is None else data[offset : offset + length]
    assert backend.get(name, offset, length) == want


def test_a_blob_deleted_while_it_streams_still_arrives_whole(srv: Server) -> None:
    # gc may delete a pack while a runner downloads it: the response already begun must
    # carry the bytes it began with, not end short or fail half-way.
    data = os.urandom(3 * STREAM_CHUNK)
    name = f"packs/{Digest.of(data).hex}"
    with srv.client() as c:
        assert c.put(blob(name), content=data).status_code == 204
        with c.stream("GET", blob(name)) as r:
            body = r.iter_bytes()
            got = [next(body)]
            assert c.delete(blob(name)).status_code == 204
            assert not (store_dir(srv) / name).exists()
            got.extend(body)
    assert b"".join(got) == data
