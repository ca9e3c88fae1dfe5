"""Attacks on the dashboard, in a real browser: markup and script in what pipelines write (job
names, step names, log lines, every field a hostile writer can send), framing, the token
cookie, logins from elsewhere, and tokens without the scope."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
import yaml
from browser import log_in, screenshot
from helpers import Env, commit_tree
from playwright.sync_api import Page, expect
from server import Server, start_server

from stickyci.server.usage import MAX_NAMES, OVERFLOW

JOB = "<script>window.pwned='job'</script>"
STEP = "<img src=x onerror=\"window.pwned='step'\">"
LINES = ["<script>window.pwned='log'</script>", "<img src=x onerror=window.pwned='img'>",
         "\"><svg onload=window.pwned='svg'>", "</pre></div><script>window.pwned='pre'</script>"]
# A real pipeline whose job name, step name and log lines are markup.
HOSTILE = yaml.safe_dump({"name": "demo", "jobs": {JOB: {"steps": [{
    "name": STEP, "run": "".join(f"echo {shlex.quote(line)}\n" for line in LINES) + "exit 1",
}]}}})
MARKUP = "<script>window.pwned='api'</script><img src=x onerror=window.pwned='api-img'>"


def hostile_report(run_id: str, state: str, jobs: int) -> dict[str, Any]:
    """A report whose every free-text field carries markup, as a hostile writer may send."""
    return {"record": {
        "id": run_id, "pipeline": f"demo{MARKUP}", "file": MARKUP, "sha": MARKUP,
        "cold": False, "state": state, "started_at": 1e9, "finished_at": 0.0,
        "executor": MARKUP, "jobs": [{
            "id": f"{MARKUP}{n}", "job": MARKUP, "state": "failure", "reason": MARKUP,
            "matrix": {MARKUP: MARKUP}, "needs": [MARKUP], "worker": MARKUP,
            "started_at": 1e9, "finished_at": 1e9 + 1,
            "steps": [{"name": MARKUP, "state": "failure", "started_at": 1e9, "seconds": 1,
                       "log": MARKUP}],
            "disks": [{"key": MARKUP, "path": MARKUP, "strategy": "copy", "error": MARKUP,
                       "commit_reason": MARKUP, "committed": True,
                       "raced_with": [{"gen": MARKUP, "committer": MARKUP}]}],
        } for n in range(jobs)]},
        "tails": [{"job": f"{MARKUP}{n}", "step": 0, "text": MARKUP} for n in range(jobs)]}


@dataclass(frozen=True)
class Site:
    server: Server
    token: str
    hostile_run: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dash-attacks")
    with start_server(root / "server") as server:
        token = server.token("--write", "demo*")
        env = Env(root, root / "unused", root / "cache",
                  {**os.environ, "STICKYCI_STORE": server.url, "STICKYCI_TOKEN": token,
                   "STICKYCI_CACHE_DIR": str(root / "cache")})
        f = root / "hostile.yml"
        f.write_text(HOSTILE)
        proc = env.run("run", str(f), "--json", check=False)
        assert proc.stdout, proc.stderr
        record = json.loads(proc.stdout)
        assert record["jobs"][0]["id"] == JOB and record["state"] == "failure"
        yield Site(server, token, record["id"])


def assert_nothing_ran(page: Page) -> None:
    assert page.evaluate("window.pwned") is None
    # Our one script, and no element a payload could have made.
    assert page.locator("script").count() == 1
    assert page.locator("main img, main svg[onload], main [onerror]").count() == 0


def test_markup_in_job_names_step_names_and_log_lines_of_a_real_run_is_text(
        site: Site, page: Page, tmp_path: Path) -> None:
    log_in(page, site.server.url, site.token, f"/ui/runs/{site.hostile_run}")
    expect(page.locator("#timeline th.job-name")).to_have_text([JOB])
    failure = page.locator("#failures .failure")
    expect(failure.locator(".job-name")).to_have_text(JOB)
    expect(failure.locator(".step-name")).to_have_text(STEP)
    tail = failure.locator("pre.tail").inner_text()
    assert all(line in tail for line in LINES), tail
    assert_nothing_ran(page)
    page.goto(f"{site.server.url}/ui/runs")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    assert_nothing_ran(page)
    screenshot(page, "dashboard-attack-run", tmp_path)


def test_markup_in_every_field_of_a_hostile_report_is_text_also_when_the_page_updates(
        site: Site, page: Page) -> None:
    client = site.server.client(site.token)
    run_id = "20261130-000000-a77ac4"
    assert client.put(f"/v1/runs/{run_id}",
                      json=hostile_report(run_id, "running", 1)).status_code == 204
    log_in(page, site.server.url, site.token, f"/ui/runs/{run_id}")
    expect(page.locator("#timeline th.job-name")).to_have_text([f"{MARKUP}0"])
    expect(page.locator("h1 .pipeline")).to_have_text(f"demo{MARKUP}")
    expect(page.locator("#races li")).to_contain_text(MARKUP)
    expect(page.locator("#disks code")).to_have_text([MARKUP])
    assert_nothing_ran(page)
    # The live update swaps in new markup from the server: still text.
    assert client.put(f"/v1/runs/{run_id}",
                      json=hostile_report(run_id, "failure", 2)).status_code == 204
    expect(page.locator("#timeline th.job-name")).to_have_text([f"{MARKUP}0", f"{MARKUP}1"])
    expect(page.locator("#run-state")).to_have_text("failure")
    assert_nothing_ran(page)
    page.goto(f"{site.server.url}/ui/runs")
    expect(page.locator(f"tr[data-run='{run_id}'] td").nth(1)).to_have_text(f"demo{MARKUP}")
    assert_nothing_ran(page)
    page.goto(f"{site.server.url}/ui/compare?pipeline=demo{MARKUP}")
    assert f"demo{MARKUP}" in page.locator("select[name=pipeline] option").all_inner_texts()
    expect(page.locator("#no-comparison strong")).to_have_text(f"demo{MARKUP}")
    assert_nothing_ran(page)


def test_no_page_can_be_framed(site: Site, page: Page) -> None:
    paths = ["/ui/login", "/ui/runs", f"/ui/runs/{site.hostile_run}",
             f"/ui/runs/{site.hostile_run}/body", "/ui/compare", "/ui/disks", "/ui/caches",
             "/ui/store"]
    cookie = {"stickyci_token": site.token}
    for path in paths:
        r = httpx2.get(f"{site.server.url}{path}", cookies=cookie)
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "script-src 'self'" in r.headers["content-security-policy"]
    # In the browser: another page framing the dashboard gets nothing of it.
    page.set_content(f"<iframe id=f src='{site.server.url}/ui/login'></iframe>")
    page.wait_for_function("document.getElementById('f').contentWindow !== null")
    frame = page.frames[-1]
    frame.wait_for_load_state()
    assert frame.locator("form.login").count() == 0


def test_the_token_cookie_is_httponly_secure_samesite_strict(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.token)
    [cookie] = page.context.cookies()
    assert cookie["value"] == site.token
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert page.evaluate("document.cookie") == ""  # out of reach of any script
    page.click("header form.who button")
    expect(page).to_have_url(f"{site.server.url}/ui/login")
    assert page.context.cookies() == []


def test_every_page_needs_a_token(site: Site, page: Page) -> None:
    page.goto(f"{site.server.url}/ui/runs/{site.hostile_run}")
    expect(page).to_have_url(
        f"{site.server.url}/ui/login?next=%2Fui%2Fruns%2F{site.hostile_run}")
    assert JOB not in page.content()
    r = httpx2.get(f"{site.server.url}/ui/runs/{site.hostile_run}/body")
    assert r.status_code == 401 and JOB not in r.text
    page.fill("input[name=token]", "sci_nope_wrong")
    page.click("form.login button")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert page.context.cookies() == []


def test_a_login_from_another_site_or_to_another_site_is_refused(site: Site) -> None:
    form = {"token": site.token, "next": "/ui/runs"}
    r = httpx2.post(f"{site.server.url}/ui/login", data=form,
                   headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    # The login reads no more than a form needs, whoever sends it.
    r = httpx2.post(f"{site.server.url}/ui/login", content=b"token=" + b"x" * (1 << 20))
    assert r.status_code == 413 and "set-cookie" not in r.headers
    for target in ("//evil.example/x", "https://evil.example/", "/ui//evil.example",
                   "/ui/\\evil.example"):
        r = httpx2.post(f"{site.server.url}/ui/login", data={**form, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/ui/runs", target


def test_a_token_without_the_scope_sees_none_of_the_runs(site: Site, page: Page) -> None:
    other = site.server.token("--read", "other*")
    log_in(page, site.server.url, other)
    expect(page.locator("#no-runs")).to_be_visible()
    assert page.locator("select[name=pipeline] option").all_inner_texts() == ["all"]
    page.goto(f"{site.server.url}/ui/runs/{site.hostile_run}")
    expect(page.locator("main .error")).to_contain_text("no run")
    assert JOB not in page.content()
    r = httpx2.get(f"{site.server.url}/ui/runs/{site.hostile_run}/body",
                  cookies={"stickyci_token": other})
    assert r.status_code == 404 and JOB not in r.text
    page.goto(f"{site.server.url}/ui/compare?pipeline=demo")
    expect(page.locator("#no-comparison")).to_be_visible()
    assert page.locator("select[name=pipeline] option").count() == 0


def test_a_revoked_token_is_logged_out(site: Site, page: Page) -> None:
    token = site.server.token("--read", "demo*")
    log_in(page, site.server.url, token)
    subprocess.run([sys.executable, "-m", "stickyci", "token", "revoke", "--state-dir",
                    str(site.server.state), token.split("_")[1]], check=True,
                   capture_output=True)
    page.goto(f"{site.server.url}/ui/runs")
    expect(page).to_have_url(f"{site.server.url}/ui/login?next=%2Fui%2Fruns")


def test_anonymous_read_opens_the_pages_read_only(tmp_path: Path, page: Page) -> None:
    with start_server(tmp_path / "s", args=["--anonymous-read"]) as s:
        run_id = "20261130-000000-0a0a0a"
        report = hostile_report(run_id, "failure", 1)
        assert s.client().put(f"/v1/runs/{run_id}", json=report).status_code == 204
        page.goto(f"{s.url}/ui/runs")
        expect(page.locator("#runs tbody tr")).to_have_count(1)
        expect(page.locator("header .who")).to_contain_text("token anonymous")
        assert_nothing_ran(page)
        r = httpx2.put(f"{s.url}/v1/runs/{run_id}", json=report)
        assert r.status_code == 401


def test_markup_in_a_disks_committer_is_text(site: Site, page: Page, tmp_path: Path) -> None:
    # A real commit, then its writer rewrites the ref's committers (free text in a ref that
    # every writer of the key controls) as markup: the server accepts it, the page shows text.
    env = Env(tmp_path, tmp_path / "unused", tmp_path / "cache",
              {**os.environ, "STICKYCI_STORE": site.server.url, "STICKYCI_TOKEN": site.token,
               "STICKYCI_CACHE_DIR": str(tmp_path / "cache")})
    commit_tree(env, "demo-evil", {"f": b"x"})
    client = site.server.client(site.token)
    ref = client.get("/v1/blobs/refs/demo-evil").raise_for_status().json()
    for g in ref["generations"]:
        g["committer"] = MARKUP
    client.put("/v1/blobs/refs/demo-evil", content=json.dumps(ref)).raise_for_status()
    log_in(page, site.server.url, site.token, "/ui/disks")
    row = page.locator("#disks tr[data-key='demo-evil']")
    expect(row.locator("td.committer")).to_have_text(MARKUP)
    row.locator("summary").click()
    expect(row.locator("ol.generations .committer")).to_have_text([MARKUP])
    assert_nothing_ran(page)


def test_markup_in_the_query_of_the_store_pages_is_text(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.token, "/ui/disks")
    page.goto(f"{site.server.url}/ui/disks?key={quote(MARKUP)}&sort={quote(MARKUP)}")
    expect(page.locator("input[name=key]")).to_have_value(MARKUP)
    expect(page.locator("#no-disks code.prefix")).to_have_text(MARKUP)
    assert_nothing_ran(page)
    for path in ("/ui/caches?window=", "/ui/store?window="):
        page.goto(f"{site.server.url}{path}{quote(MARKUP)}")
        expect(page.locator("h1")).to_be_visible()
        assert_nothing_ran(page)


def test_the_store_pages_need_a_token(site: Site) -> None:
    for path in ("/ui/disks", "/ui/caches", "/ui/store"):
        r = httpx2.get(f"{site.server.url}{path}")
        assert r.status_code == 303, path
        assert r.headers["location"] == f"/ui/login?next={quote(path, safe='')}"


def test_made_up_cache_names_are_bounded_and_their_overflow_is_shown_to_no_scoped_token(
        site: Site, page: Page) -> None:
    # A token that may read junk-* names a new instance on every request (each a miss). More
    # than twice MAX_NAMES in all: however the minutes fall, one of them overflows.
    flooder = site.server.token("--read", "junk-*")
    missing = hashlib.sha256(b"nothing").hexdigest()
    with site.server.client(flooder) as c:
        for n in range(2 * MAX_NAMES + 50):
            assert c.get(f"/junk-{n}/ac/{missing}").status_code == 404
    # Names are checked before anything is counted: markup never becomes a cache name.
    with site.server.client() as c:
        assert c.get(f"/{quote(MARKUP, safe='')}/ac/{missing}").status_code in (400, 404)
    log_in(page, site.server.url, site.server.admin, "/ui/caches")
    names = page.locator("#caches tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.name)")
    assert OVERFLOW in names and len(names) <= 2 * MAX_NAMES + 1
    assert_nothing_ran(page)
    # A pattern that matches the overflow's name is still not shown it: it is everyone's.
    page.context.clear_cookies()
    log_in(page, site.server.url, site.server.token("--read", "?other?"), "/ui/caches")
    expect(page.locator("#no-caches")).to_be_visible()
