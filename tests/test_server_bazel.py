"""The Bazel HTTP cache protocol of ``stickyci serve`` (``[/instance]/ac|cas/<sha256>``).

Every test talks HTTP to a real ``stickyci serve`` subprocess. The protocol tests share one
server and keep apart by using fresh random content (so fresh digests) per test; the tests
of ``--anonymous-read`` and ``--max-size`` start servers of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import Server, start_server

KiB = 1024


def blob(size: int = 64) -> tuple[bytes, str]:
    """Random bytes and their SHA-256: a digest no other test uses."""
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def metric(client: httpx2.Client, name: str, **labels: str) -> float:
    """The value of one sample on ``/metrics`` (0 if the labelled series does not exist yet)."""
    text = client.get("/metrics").raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def cache_bytes(store: Path) -> int:
    """Bytes of Bazel cache entries on disk (lock files aside)."""
    return sum(e.stat().st_size for ns in ("ac", "cas") if (store / ns).is_dir()
               for e in os.scandir(store / ns) if not e.name.startswith("."))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("bazel")) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_for(server: Server) -> Callable[..., str]:
    """A token per distinct scope, created once."""
    return server.scoped


@pytest.fixture
def admin(server: Server) -> Iterator[httpx2.Client]:
    with server.client() as c:
        yield c


# -- the protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/ci-linux"])
def test_cas_put_get_head(admin: httpx2.Client, prefix: str) -> None:
    data, digest = blob(3000)
    url = f"{prefix}/cas/{digest}"
    assert admin.get(url).status_code == 404
    assert admin.put(url, content=data).status_code == 200
    got = admin.get(url)
    assert got.status_code == 200 and got.content == data
    head = admin.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data)) and head.content == b""


@pytest.mark.parametrize("prefix", ["", "/ci-linux"])
def test_ac_put_get_head_and_overwrite(admin: httpx2.Client, prefix: str) -> None:
    # An AC key is the action's digest, not the body's: any body is accepted under any key.
    _, key = blob()
    url = f"{prefix}/ac/{key}"
    assert admin.head(url).status_code == 404
    assert admin.put(url, content=b"first result").status_code == 200
    assert admin.get(url).content == b"first result"
    assert admin.put(url, content=b"a newer result").status_code == 200
    assert admin.get(url).content == b"a newer result"
    assert admin.head(url).headers["content-length"] == str(len(b"a newer result"))


def test_cas_upload_that_does_not_hash_to_its_name_is_refused(server: Server,
                                                               admin: httpx2.Client) -> None:
    data, digest = blob()
    _, other = blob()
    got = admin.put(f"/cas/{other}", content=data)
    assert got.status_code == 400
    assert "does not hash" in got.json()["error"]
    assert admin.get(f"/cas/{other}").status_code == 404
    store = Path(server.store_url.removeprefix("file://"))
    assert not (store / "cas" / f"default.{other}").exists()
    # A body truncated on the way is refused the same way.
    assert admin.put(f"/cas/{digest}", content=data[:-1]).status_code == 400
    assert admin.get(f"/cas/{digest}").status_code == 404


@pytest.mark.parametrize("path", [
    "/cas/" + "a" * 63,                 # too short
    "/cas/" + "a" * 65,                 # too long
    "/ac/" + "A" * 64,                  # upper case: Bazel sends lower-case hex
    "/ac/" + "g" * 64,                  # not hex
    "/ac/" + "a" * 40,                  # a SHA-1 length digest
    "/bad.instance/ac/" + "a" * 64,     # instance names are letters, digits, '_' and '-'
    "/-dash/cas/" + "a" * 64,
])
def test_malformed_names_are_400(admin: httpx2.Client, path: str) -> None:
    for method in ("GET", "HEAD", "PUT"):
        got = admin.request(method, path, content=b"x" if method == "PUT" else None)
        assert got.status_code == 400, (method, path, got.status_code)


def test_unknown_entry_is_404_and_counted_as_a_miss(admin: httpx2.Client) -> None:
    _, digest = blob()
    misses = {k: metric(admin, "stickyci_cache_lookups_total", kind=k, result="miss")
              for k in ("ac", "cas")}
    hits = metric(admin, "stickyci_cache_lookups_total", kind="cas", result="hit")
    assert admin.get(f"/ac/{digest}").status_code == 404
    assert admin.head(f"/ci-linux/ac/{digest}").status_code == 404
    assert admin.get(f"/cas/{digest}").status_code == 404
    assert metric(admin, "stickyci_cache_lookups_total", kind="ac", result="miss") \
        == misses["ac"] + 2
    assert metric(admin, "stickyci_cache_lookups_total", kind="cas", result="miss") \
        == misses["cas"] + 1
    data, digest = blob()
    admin.put(f"/cas/{digest}", content=data).raise_for_status()
    admin.get(f"/cas/{digest}").raise_for_status()
    assert metric(admin, "stickyci_cache_lookups_total", kind="cas", result="hit") == hits + 1


def test_ac_and_cas_are_per_instance(admin: httpx2.Client) -> None:
    _, key = blob()
    admin.put(f"/team-a/ac/{key}", content=b"result of a").raise_for_status()
    assert admin.get(f"/team-a/ac/{key}").content == b"result of a"
    assert admin.get(f"/team-b/ac/{key}").status_code == 404
    assert admin.get(f"/ac/{key}").status_code == 404
    # No prefix is the instance "default", and addressing it by name is the same cache.
    admin.put(f"/ac/{key}", content=b"result of default").raise_for_status()
    assert admin.get(f"/default/ac/{key}").content == b"result of default"
    assert admin.get(f"/team-a/ac/{key}").content == b"result of a"

    data, digest = blob()
    admin.put(f"/team-a/cas/{digest}", content=data).raise_for_status()
    assert admin.get(f"/team-a/cas/{digest}").content == data
    assert admin.get(f"/team-b/cas/{digest}").status_code == 404
    assert admin.head(f"/cas/{digest}").status_code == 404
    admin.put(f"/cas/{digest}", content=data).raise_for_status()
    assert admin.get(f"/default/cas/{digest}").content == data


def test_a_token_cannot_read_or_probe_another_instances_cas(server: Server,
                                                            admin: httpx2.Client) -> None:
    """Attack: a pull request's token asks for main's content by a digest it guessed (a
    small file it can enumerate, say), in its own instance and in main's."""
    data, digest = blob()
    admin.put(f"/main/cas/{digest}", content=data).raise_for_status()
    with server.client(server.scoped("--write", "pr-1-*")) as pr:
        assert pr.get(f"/pr-1-a/cas/{digest}").status_code == 404
        assert pr.head(f"/pr-1-a/cas/{digest}").status_code == 404
        assert pr.get(f"/main/cas/{digest}").status_code == 403
        assert pr.head(f"/main/cas/{digest}").status_code == 403
        # Uploading the same content to its own instance gives it that copy only.
        pr.put(f"/pr-1-a/cas/{digest}", content=data).raise_for_status()
        assert pr.get(f"/pr-1-a/cas/{digest}").content == data
    assert admin.get(f"/main/cas/{digest}").content == data


def test_reads_small_and_large_answer_and_count_alike(server: Server,
                                                     admin: httpx2.Client) -> None:
    # A small entry is answered in front of the router, one over 256 KiB by the route: the
    # same bytes, one hit each, and an access-log line naming the token, not showing it.
    mark = server.log.stat().st_size
    for size in (2 * KiB, 300 * KiB):
        data, digest = blob(size)
        admin.put(f"/ci-linux/cas/{digest}", content=data).raise_for_status()
        hits = metric(admin, "stickyci_cache_lookups_total", kind="cas", result="hit")
        got = admin.get(f"/ci-linux/cas/{digest}")
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-length"] == str(size) and got.headers["x-request-id"]
        assert metric(admin, "stickyci_cache_lookups_total", kind="cas", result="hit") \
            == hits + 1
    lines = [json.loads(line) for line in server.log.read_bytes()[mark:].decode().splitlines()
             if line.startswith("{") and "/ci-linux/cas/" in line and '"GET"' in line]
    assert len(lines) == 2 and {line["status"] for line in lines} == {200}
    token_id = server.admin.split("_")[1]
    assert all(line["token"] == token_id for line in lines)
    assert server.admin.split("_", 2)[2] not in server.log.read_text()


def test_an_instance_named_like_a_route_is_that_routes(admin: httpx2.Client) -> None:
    # "/nix/ac/<64 hex>" is the Nix cache "ac"'s file, as the router has it, not Bazel's.
    _, digest = blob()
    misses = metric(admin, "stickyci_cache_lookups_total", kind="ac", result="miss")
    got = admin.get(f"/nix/ac/{digest}")
    assert got.status_code in (400, 404) and "nix" in got.text.lower()
    assert metric(admin, "stickyci_cache_lookups_total", kind="ac", result="miss") == misses


# -- auth: the instance is the key token patterns match -------------------------------------


def test_requests_without_a_valid_token_are_401(server: Server) -> None:
    data, digest = blob()
    with server.client("") as anon, server.client("sci_00000000_not-a-secret") as bad:
        for c in (anon, bad):
            assert c.get(f"/cas/{digest}").status_code == 401
            got = c.put(f"/cas/{digest}", content=data)
            assert got.status_code == 401
            assert got.headers["www-authenticate"].startswith("Bearer")
    with server.client() as admin:
        assert admin.get(f"/cas/{digest}").status_code == 404  # nothing was stored


# (token scope args, method, instance ("" = default), expected status)
SCOPE_CASES = [
    (["--read", "default"], "GET", "", 404),
    (["--read", "default"], "GET", "default", 404),
    (["--read", "default"], "PUT", "", 403),
    (["--read", "default"], "GET", "team-a", 403),
    (["--write", "default"], "PUT", "", 200),
    (["--write", "default"], "GET", "", 404),           # write implies read
    (["--write", "default"], "PUT", "team-a", 403),
    (["--write", "team-*"], "PUT", "team-a", 200),
    (["--write", "team-*"], "PUT", "", 403),
    (["--write", "team-*"], "HEAD", "teams", 403),
    (["--read", "main-*", "--write", "pr-123-*"], "GET", "main-linux", 404),
    (["--read", "main-*", "--write", "pr-123-*"], "PUT", "main-linux", 403),
    (["--read", "main-*", "--write", "pr-123-*"], "PUT", "pr-123-linux", 200),
    (["--read", "main-*", "--write", "pr-123-*"], "GET", "pr-124-linux", 403),
    (["--delete", "*"], "GET", "", 404),                # delete implies read
    (["--delete", "*"], "PUT", "", 403),                # but not write
]


@pytest.mark.parametrize("kind", ["ac", "cas"])
@pytest.mark.parametrize(("scope", "method", "instance", "status"), SCOPE_CASES)
def test_token_scopes_match_the_instance(server: Server, token_for: Callable[..., str],
                                         kind: str, scope: list[str], method: str,
                                         instance: str, status: int) -> None:
    data, digest = blob()
    url = f"{'/' + instance if instance else ''}/{kind}/{digest}"
    with server.client(token_for(*scope)) as c:
        got = c.request(method, url, content=data if method == "PUT" else None)
    assert got.status_code == status, got.text
    with server.client() as admin:  # what the admin sees proves whether the PUT stored
        assert admin.get(url).status_code == (200 if method == "PUT" and status == 200
                                               else 404)


def test_anonymous_read_server(tmp_path: Path) -> None:
    with start_server(tmp_path, args=["--anonymous-read"]) as srv, \
            srv.client("") as anon, srv.client() as admin:
        data, digest = blob()
        _, key = blob()
        admin.put(f"/cas/{digest}", content=data).raise_for_status()
        admin.put(f"/ci/ac/{key}", content=b"result").raise_for_status()
        assert anon.get(f"/cas/{digest}").content == data
        assert anon.head(f"/cas/{digest}").status_code == 200
        assert anon.head(f"/ci/cas/{digest}").status_code == 404
        assert anon.get(f"/ci/ac/{key}").content == b"result"
        assert anon.get(f"/ac/{key}").status_code == 404
        # Writing still needs a token: 401 (send one), not 403 (yours can't).
        other, other_digest = blob()
        assert anon.put(f"/cas/{other_digest}", content=other).status_code == 401
        assert anon.put(f"/ac/{key}", content=b"forged").status_code == 401
        assert admin.get(f"/cas/{other_digest}").status_code == 404
        assert admin.get(f"/ac/{key}").status_code == 404
        # A bad token is refused, not downgraded to anonymous.
        with srv.client("sci_00000000_wrong") as bad:
            assert bad.get(f"/cas/{digest}").status_code == 401


# -- --max-size: least-recently-used eviction -----------------------------------------------


LIMIT = 1024 * KiB
ENTRY = 100 * KiB


def put_entry(c: httpx2.Client, i: int) -> str:
    """Upload a 100 KiB entry, CAS or AC by turn, and return its URL."""
    data, digest = blob(ENTRY)
    url = f"/cas/{digest}" if i % 2 else f"/ci/ac/{digest}"
    c.put(url, content=data).raise_for_status()
    return url


def present(c: httpx2.Client, urls: list[str]) -> list[bool]:
    # HEAD touches entries too; callers look only after the last upload.
    return [c.head(u).status_code == 200 for u in urls]


def test_max_size_evicts_least_recently_used(tmp_path: Path) -> None:
    with start_server(tmp_path, args=["--max-size", "1M"]) as srv, srv.client() as c:
        first = [put_entry(c, i) for i in range(8)]          # 800 KiB: under the limit
        for url in first[:3]:                                # now the most recently used
            c.get(url).raise_for_status()
        later = [put_entry(c, i) for i in range(8, 12)]      # 1200 KiB in all: over it
        lru_order = first[3:] + first[:3] + later            # oldest use first

        alive = present(c, lru_order)
        evicted = alive.index(True)
        assert evicted > 0, "nothing was evicted"
        # Exactly the least recently used went, and the touched old entries survived.
        assert alive == [False] * evicted + [True] * (len(lru_order) - evicted)
        assert evicted <= len(first) - 3
        store = tmp_path / "store"
        assert cache_bytes(store) <= LIMIT
        assert cache_bytes(store) == (len(lru_order) - evicted) * ENTRY
        evictions = (metric(c, "stickyci_evictions_total", kind="ac")
                     + metric(c, "stickyci_evictions_total", kind="cas"))
        assert evictions == evicted


def test_restart_seeds_the_lru_from_the_store(tmp_path: Path) -> None:
    with start_server(tmp_path, args=["--max-size", "1M"]) as srv, srv.client() as c:
        old = [put_entry(c, i) for i in range(6)]            # 600 KiB, in upload order
        c.get(old[-1]).raise_for_status()  # a use the restart forgets: it keeps no state
    with start_server(tmp_path, args=["--max-size", "1M"]) as srv, srv.client() as c:
        c.get(old[2]).raise_for_status()                     # used since the restart
        new = [put_entry(c, i) for i in range(6)]            # 1200 KiB in all
        # Without seeding the server would know only the new 600 KiB and evict nothing.
        lru_order = [old[0], old[1], old[3], old[4], old[5], old[2], *new]
        alive = present(c, lru_order)
        evicted = alive.index(True)
        assert evicted > 0, "nothing was evicted: the LRU was not seeded from the store"
        assert alive == [False] * evicted + [True] * (len(lru_order) - evicted)
        assert all(alive[-7:]), "an entry used or stored since the restart was evicted"
        assert cache_bytes(tmp_path / "store") <= LIMIT


def test_concurrent_uploads_evict_each_entry_once(tmp_path: Path) -> None:
    with start_server(tmp_path, args=["--max-size", "1M"]) as srv, srv.client() as c:
        # Uploads racing each other must not claim the same victims: every eviction counted
        # is an entry gone, and the cache ends within its limit.
        with ThreadPoolExecutor(8) as pool:
            urls = list(pool.map(lambda i: put_entry(c, i), range(40)))
        gone = present(c, urls).count(False)
        assert gone >= 40 - LIMIT // ENTRY
        evictions = (metric(c, "stickyci_evictions_total", kind="ac")
                     + metric(c, "stickyci_evictions_total", kind="cas"))
        assert evictions == gone
        assert cache_bytes(tmp_path / "store") <= LIMIT
