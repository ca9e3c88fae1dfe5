"""The dashboard's disks and store pages in a real browser (headless Chromium), against a real
``stickyci serve`` whose disks were committed by real ``stickyci disk`` commands: what each
token sees of the disks, the bytes they share, who committed; the store's size over time and
what a real scheduled gc reclaimed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import log_in, screenshot
from helpers import Env, commit_tree, wait_for
from playwright.sync_api import Page, expect
from server import Server, remote, start_server, store_dir

KiB = 1 << 10
SHARED = os.urandom(300 * KiB)  # in team-a-deps, team-a-tools and team-b-secret
HIDDEN = os.urandom(200 * KiB)  # in team-a-tools and team-b-secret only


@dataclass(frozen=True)
class Site:
    """A server, tokens, and the disks as ``disk show`` reports them."""

    server: Server
    reader: str  # reads team-a-*
    disks: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dash-disks")
    with start_server(root / "server") as server:
        env = Env(root, root / "unused", root / "cache", dict(os.environ))
        team_a = remote(env, server, server.token("--write", "team-a-*"), cache="a")
        team_b = remote(env, server, server.token("--write", "team-b-*"), cache="b")
        commit_tree(team_a, "team-a-deps", {"lib.bin": SHARED, "a.txt": b"one"}, ws="deps")
        # A second generation: the mount holds the first, one file changes.
        commit_tree(team_a, "team-a-deps", {"a.txt": b"two, longer"}, ws="deps2")
        commit_tree(team_a, "team-a-tools", {"lib.bin": SHARED, "hidden.bin": HIDDEN},
                    ws="tools")
        commit_tree(team_b, "team-b-secret", {"lib.bin": SHARED, "hidden.bin": HIDDEN,
                                              "b.txt": b"b"}, ws="secret")
        admin = remote(env, server, cache="admin")
        disks = {k: admin.json("disk", "show", k)
                 for k in ("team-a-deps", "team-a-tools", "team-b-secret")}
        yield Site(server, server.token("--read", "team-a-*"), disks)


def shown(page: Page, key: str, column: str) -> int:
    """The bytes a column of a disk's row says."""
    value = page.locator(f"#disks tr[data-key='{key}'] td.{column}").get_attribute("data-bytes")
    assert value is not None and value.isdigit(), value
    return int(value)


def test_a_scoped_token_sees_its_disks_with_generations_sizes_and_committers(
        site: Site, page: Page, tmp_path: Path) -> None:
    log_in(page, site.server.url, site.reader, "/ui/disks")
    rows = page.locator("#disks tbody tr")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.key)") == [
        "team-a-deps", "team-a-tools"]
    assert "team-b-secret" not in page.content()  # a token without the scope sees no trace
    deps = site.disks["team-a-deps"]
    latest = deps["generations"][-1]
    row = page.locator("#disks tr[data-key='team-a-deps']")
    expect(row.locator("td.gen")).to_have_text(str(latest["gen"]))
    expect(row.locator("td.kept")).to_have_text(str(len(deps["generations"])))
    assert len(deps["generations"]) == 2
    assert shown(page, "team-a-deps", "size") == latest["size"]
    expect(row.locator("td.committer")).to_have_text(latest["committer"])
    # Every kept generation, newest first, with who committed it.
    row.locator("summary").click()
    gens = row.locator("ol.generations li")
    assert gens.evaluate_all("li => li.map(l => +l.dataset.gen)") == [
        g["gen"] for g in reversed(deps["generations"])]
    expect(gens.locator(".committer")).to_have_text(
        [g["committer"] for g in reversed(deps["generations"])])
    screenshot(page, "dashboard-disks", tmp_path)


def test_shared_bytes_count_only_the_disks_the_token_may_read(site: Site, page: Page) -> None:
    # HIDDEN is shared with team-b-secret, which this token may not read: not counted, or the
    # page would tell it what a disk of another team holds.
    log_in(page, site.server.url, site.reader, "/ui/disks")
    assert shown(page, "team-a-deps", "shared") == len(SHARED)
    assert shown(page, "team-a-tools", "shared") == len(SHARED)
    page.context.clear_cookies()
    log_in(page, site.server.url, site.server.admin, "/ui/disks")
    expect(page.locator("#disks tbody tr")).to_have_count(3)
    assert shown(page, "team-a-deps", "shared") == len(SHARED)
    assert shown(page, "team-a-tools", "shared") == len(SHARED) + len(HIDDEN)
    assert shown(page, "team-b-secret", "shared") == len(SHARED) + len(HIDDEN)


def test_disks_filter_by_key_prefix_and_sort_by_size(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.server.admin, "/ui/disks")
    page.select_option("select[name=sort]", "size")
    page.click("form.filters button")
    keys = page.locator("#disks tbody tr").evaluate_all("rows => rows.map(r => r.dataset.key)")
    sizes = {k: d["generations"][-1]["size"] for k, d in site.disks.items()}
    assert keys == sorted(sizes, key=lambda k: -sizes[k])
    page.fill("input[name=key]", "team-a-t")
    page.click("form.filters button")
    expect(page.locator("#disks tbody tr")).to_have_count(1)
    page.fill("input[name=key]", "nope")
    page.click("form.filters button")
    expect(page.locator("#no-disks")).to_contain_text("nope")


def test_a_token_of_another_scope_sees_no_disk(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.server.token("--read", "other-*"), "/ui/disks")
    expect(page.locator("#no-disks")).to_be_visible()
    assert "team-" not in page.locator("main").inner_text()


def store_bytes(root: Path) -> int:
    """What the store's namespaces hold on disk, summed as the server measures them."""
    return sum(f.stat().st_size for ns in ("packs", "index", "refs", "roots", "ac", "cas", "nix")
               for f in (root / ns).glob("*") if f.is_file() and not f.name.startswith("."))


def test_the_store_page_shows_its_size_over_time_and_what_each_gc_reclaimed(
        tmp_path: Path, page: Page) -> None:
    root = tmp_path / "server"
    env = Env(tmp_path, tmp_path / "unused", tmp_path / "cache", dict(os.environ))
    with start_server(root) as server:
        admin = remote(env, server, cache="admin")
        commit_tree(admin, "keep", {"k.bin": os.urandom(100 * KiB)}, ws="keep")
        commit_tree(admin, "gone", {"g.bin": os.urandom(600 * KiB)}, ws="gone")
        admin.run("disk", "rm", "gone")
        before = store_bytes(store_dir(server))
        port = server.port
    # The same store and state, now with the schedule: eviction (nothing is a week unused),
    # then gc, every second; gc reclaims the removed disk's pack.
    with start_server(root, port=port, args=["--evict-after", "7d", "--evict-every", "1s",
                                             "--gc-grace", "0s"]) as server:
        client = server.client()

        def reclaimed() -> bool:
            return "gc-run" in client.get("/ui/store").text and \
                store_bytes(store_dir(server)) < before - 500 * KiB

        wait_for(reclaimed, "a scheduled gc to reclaim the removed disk")
        after = store_bytes(store_dir(server))
        log_in(page, server.url, server.admin, "/ui/store")
        runs = page.locator("#gc-runs tr.gc-run")
        freed = [int(v or 0) for v in runs.locator("td.freed").evaluate_all(
            "tds => tds.map(td => td.dataset.bytes)")]
        # One run freed the removed disk's pack (gc counts packs, not their small indexes).
        assert max(freed) >= 600 * KiB
        assert sum(freed) <= before - after < sum(freed) + 16 * KiB
        # Measured at each start-up (the first on an empty store) and after each gc.
        sizes = [int(v) for v in page.locator("#size-chart circle").evaluate_all(
            "cs => cs.map(c => c.dataset.bytes)")]
        assert sizes[0] == 0 and sizes[-1] == after and len(sizes) >= 1 + len(freed)
        expect(page.locator("#store-detail tr[data-ns='packs'] td.num")).to_have_attribute(
            "data-bytes", str(sum(f.stat().st_size
                                  for f in (store_dir(server) / "packs").glob("*"))))
        screenshot(page, "dashboard-store", tmp_path)
        # The store is everyone's: a scoped token is told so, and sees none of it.
        page.context.clear_cookies()
        log_in(page, server.url, server.token("--read", "keep"), "/ui/store")
        expect(page.locator("#store-hidden")).to_be_visible()
        expect(page.locator("#gc-runs")).to_have_count(0)
