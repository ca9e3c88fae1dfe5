"""The dashboard's caches page in a real browser (headless Chromium), against a real
``stickyci serve`` serving real ccache builds (Debian's ccache, Bazel layout) for two
instances and a real Nix copy and substitution: lookups, hits and bytes served per instance
and cache as the server's access log counts them, each token shown the caches its patterns
cover, evictions, and the history kept across a restart."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from browser import log_in, screenshot
from nix_helpers import NIX, Nix, public_key
from playwright.sync_api import Page, expect
from prometheus_client.parser import text_string_to_metric_families
from server import Server, start_server

from stickyci.server.api.dashboard_store import cache_page
from stickyci.server.auth import Principal, Scope
from stickyci.server.history import History, minute_of
from stickyci.server.usage import MAX_NAMES, OVERFLOW, CacheUse, Use

ADMIN = Principal("admin", Scope(admin=True))

UNITS = 6
pytestmark = pytest.mark.skipif(shutil.which("ccache") is None or NIX is None,
                                reason="needs ccache and Nix (apt-get install ccache nix-bin)")
# What the Bazel and Nix handlers count as lookups: an entry, a narinfo, a NAR as served.
LOOKUPS = {"bazel": r"^/{name}/(ac|cas)/[0-9a-f]{{64}}$",
           "nix": r"^/nix/{name}/([0-9a-df-np-sv-z]{{32}}\.narinfo|"
                  r"nar/[0-9a-df-np-sv-z]{{52}}\.nar(\.zst)?)$"}


def write_code(root: Path) -> None:
    """A few translation units for ccache to compile."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(UNITS):
        (root / f"unit_{i}.c").write_text(
            f"int unit_{i}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += k * {i + 3};"
            f" return s; }}\n")


def ccache_build(work: Path, code: Path, server: Server, token: str,
                 instance: str) -> dict[str, int]:
    """Compile every unit with ``ccache gcc`` and a new, empty local cache, ``instance`` of
    the server as its remote storage; ccache's counters."""
    config = work / "ccache.conf"
    config.touch()  # empty, and it stops ccache reading the system's config
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCACHE_")}
    host = server.url.removeprefix("http://")
    env.update(CCACHE_CONFIGPATH=str(config), CCACHE_DIR=str(work / f"cc-{uuid.uuid4().hex}"),
               CCACHE_REMOTE_STORAGE=f"http://{host}/{instance}|layout=bazel|"
                                     f"bearer-token={token}")
    for unit in sorted(code.glob("*.c")):
        subprocess.run(["ccache", "gcc", "-O2", "-c", unit.name, "-o", f"{unit.stem}.o"],
                       cwd=code, env=env, check=True, capture_output=True)
    printed = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True,
                             text=True, check=True).stdout
    return {k: int(v) for k, _, v in (line.partition("\t") for line in printed.splitlines())}


@dataclass(frozen=True)
class Seen:
    """One instance's lookups as the server's access log tells them."""

    hits: int
    misses: int
    served: int


def from_access_log(server: Server, name: str, family: str = "bazel") -> Seen:
    """Count the lookups (GETs and HEADs) of a Bazel instance or a Nix cache in the access
    log: 200 is a hit, 404 a miss."""
    lookup = re.compile(LOOKUPS[family].format(name=re.escape(name)))
    hits = misses = served = 0
    for line in server.log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r["method"] not in ("GET", "HEAD") or not lookup.match(r["path"]):
            continue
        if r["status"] == 200:
            hits, served = hits + 1, served + r["out"]
        elif r["status"] == 404:
            misses += 1
    return Seen(hits, misses, served)


def evictions(server: Server) -> dict[str, int]:
    """``stickyci_evictions_total`` per kind, from ``/metrics``."""
    with server.client() as c:
        text = c.get("/metrics").raise_for_status().text
    return {s.labels["kind"]: int(s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "stickyci_evictions_total"}


@dataclass(frozen=True)
class Site:
    server: Server
    reader: str  # reads team-a
    builds: dict[str, dict[str, int]]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dash-caches")
    code = root / "code"
    write_code(code)
    with start_server(root / "server", args=["--max-size", "1M"]) as server:
        a = server.token("--write", "team-a")
        b = server.token("--write", "team-b")
        reader_token = server.token("--read", "team-a")
        builds = {"a-first": ccache_build(root, code, server, a, "team-a"),
                  "a-second": ccache_build(root, code, server, a, "team-a"),
                  "b-first": ccache_build(root, code, server, b, "team-b")}
        assert builds["a-second"]["remote_storage_hit"] == UNITS
        assert builds["b-first"]["remote_storage_miss"] == UNITS
        # Nix: a closure copied to the cache team-a, then substituted by a reader.
        url = f"{server.url}/nix/team-a"
        writer = Nix(root / "nix-writer")
        _, path = writer.build_chain("dash")
        copied = writer.copy_to(url, path, netrc=writer.netrc("127.0.0.1", a))
        assert copied.returncode == 0, copied.stderr
        reader = Nix(root / "nix-reader")
        got = reader.substitute(url, public_key(server.state, "team-a"), path,
                                netrc=reader.netrc("127.0.0.1", reader_token))
        assert got.returncode == 0, got.stderr
        # Then the cache goes over --max-size: the oldest entries are evicted.
        with server.client() as c:
            for _ in range(3):
                data = os.urandom(400 << 10)
                digest = hashlib.sha256(data).hexdigest()
                c.put(f"/bulk/cas/{digest}", content=data).raise_for_status()
        assert sum(evictions(server).values()) > 0
        yield Site(server, reader_token, builds)


def check_row(page: Page, name: str, seen: Seen, family: str = "bazel") -> None:
    """The caches page's row of a Bazel instance or a Nix cache says what the access log
    says."""
    row = page.locator(f"#caches tr[data-family='{family}'][data-name='{name}']")
    expect(row.locator("td.lookups")).to_have_text(str(seen.hits + seen.misses))
    expect(row.locator("td.hits")).to_have_text(str(seen.hits))
    expect(row.locator("td.rate")).to_have_text(
        f"{100 * seen.hits / (seen.hits + seen.misses):.0f}%")
    expect(row.locator("td.served")).to_have_attribute("data-bytes", str(seen.served))
    # The chart's bars hold every lookup of the window.
    bars = row.locator("g.bucket").evaluate_all("gs => gs.map(g => +g.dataset.lookups)")
    assert bars and sum(bars) == seen.hits + seen.misses


def test_an_admin_sees_each_instances_hit_rate_bytes_served_and_evictions(
        site: Site, page: Page, tmp_path: Path) -> None:
    a, b = from_access_log(site.server, "team-a"), from_access_log(site.server, "team-b")
    # What ccache itself counted: the first build of team-a missed, the second hit.
    assert a.hits >= site.builds["a-second"]["remote_storage_hit"] > 0
    assert a.misses >= site.builds["a-first"]["remote_storage_miss"] > 0
    assert b.hits == 0 and b.misses >= UNITS
    nix = from_access_log(site.server, "team-a", "nix")
    assert nix.hits >= 2 and nix.misses >= 2  # the copy asked first, the reader found both
    log_in(page, site.server.url, site.server.admin, "/ui/caches")
    rows = page.locator("#caches tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.family + ' ' + r.dataset.name)")
    assert rows == ["bazel team-a", "bazel team-b", "nix team-a"]
    check_row(page, "team-a", a)
    check_row(page, "team-b", b)
    check_row(page, "team-a", nix, "nix")
    for kind, n in evictions(site.server).items():
        expect(page.locator(f"#evictions tr[data-kind='{kind}'] td.started")).to_have_text(
            str(n))
    screenshot(page, "dashboard-caches", tmp_path)


def test_a_scoped_token_sees_only_the_instances_it_may_read(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.reader, "/ui/caches")
    rows = page.locator("#caches tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.family + ' ' + r.dataset.name)")
    assert rows == ["bazel team-a", "nix team-a"]
    check_row(page, "team-a", from_access_log(site.server, "team-a"))
    check_row(page, "team-a", from_access_log(site.server, "team-a", "nix"), "nix")
    assert "team-b" not in page.content()
    # Evictions are of every instance: not this token's to see.
    expect(page.locator("#evictions-hidden")).to_be_visible()
    page.context.clear_cookies()
    log_in(page, site.server.url, site.server.token("--read", "other"), "/ui/caches")
    expect(page.locator("#no-caches")).to_be_visible()


def test_cache_use_is_kept_across_a_restart(tmp_path: Path, page: Page) -> None:
    data = os.urandom(5000)
    digest = hashlib.sha256(data).hexdigest()
    missing = hashlib.sha256(b"never stored").hexdigest()
    with start_server(tmp_path / "s") as server:
        with server.client() as c:
            assert c.get(f"/keep/cas/{missing}").status_code == 404
            c.put(f"/keep/cas/{digest}", content=data).raise_for_status()
            assert c.get(f"/keep/cas/{digest}").content == data
            assert c.head(f"/keep/cas/{digest}").status_code == 200
        port = server.port
    # Stopped (SIGTERM): the minute under way was written as the server shut down.
    with start_server(tmp_path / "s", port=port) as server:
        log_in(page, server.url, server.admin, "/ui/caches")
        check_row(page, "keep", Seen(hits=2, misses=1, served=len(data)))
        with httpx2.Client() as c:  # a fresh process: its counters start from nothing
            text = c.get(f"{server.url}/metrics").text
        assert 'stickyci_cache_lookups_total{kind="cas"' not in text


def test_a_minute_counts_at_most_max_names_caches_apart() -> None:
    use = CacheUse()
    for n in range(MAX_NAMES + 10):
        use.record({"path_params": {"instance": f"i{n}"}}, "ac", False, 404, 0)
    use.record({"path_params": {"instance": "i0"}}, "cas", True, 200, 7)  # known: counted apart
    use.record({"path": "/gha/download/12", "path_params": {}}, None, None, 200, 5)
    use.record({"path": "/v1/blobs/x", "path_params": {}}, None, None, 200, 9)  # no cache use
    got = use.take()
    assert len(got) == MAX_NAMES + 2
    assert got[("bazel", OVERFLOW)] == Use(misses=10)
    assert got[("bazel", "i0")] == Use(hits=1, misses=1, bytes_out=7)
    assert got[("gha", "")] == Use(bytes_out=5)
    assert use.take() == {}


def test_a_weeks_chart_from_hourly_rows_sums_what_the_minutes_hold(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    now = time.time()
    # Use spread over three days, some minutes of an hour twice (a shutdown, then the sample).
    for k, minute in enumerate(range(minute_of(now) - 3 * 1440, minute_of(now) + 1, 97)):
        history.add_use(minute, {("bazel", "x"): Use(k % 3, 1, 10 * k)}, {})
        history.add_use(minute, {("nix", "y"): Use(1, 0, 5)}, {})
    week = cache_page(history, {("bazel", "x"): Use(hits=4)}, {}, ADMIN, "7d", now)
    minutes = history.use(minute_of(now) - 7 * 1440, 1, 7 * 1440 + 1,
                          {("bazel", "x"): Use(hits=4)})
    assert [(c.family, c.name, c.total) for c in week.lines] == [
        (s.family, s.name, s.total) for s in minutes]
    assert week.lines[0].total.hits > 4
    # The minute under way is in the last bar.
    assert week.lines[0].bars[-1].x == week.bars - 1
