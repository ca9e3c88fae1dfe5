"""The dashboard in a real browser (headless Chromium), against a real ``stickyci serve`` fed
by real runs: the runs list, one run's timeline, failures, races and disks, a live run, and
cold runs against warm ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import log_in, screenshot
from helpers import Env, wait_for
from playwright.sync_api import Page, expect
from server import Server, start_server

from stickyci.runs import duration

PIPELINE = """
name: demo
jobs:
  build:
    disks: [{key: "demo-deps", path: deps}]
    steps:
      - {name: fetch, run: "test -e deps/lib || head -c 200000 /dev/urandom > deps/lib"}
      - {name: compile, run: "echo compiled"}
  test:
    needs: [build]
    steps:
      - {name: unit, run: "echo running unit tests; echo 'FAILED test_add: 2 != 3'; exit {code}"}
  lint:
    steps: [{run: "true"}]
"""

# Two jobs commit one disk, each after both mounted it: the second commit races the first.
RACES = """
name: demo-races
jobs:
  left:
    disks: [{key: "demo-shared", path: d}]
    steps: [{run: "touch {dir}/L; while [ ! -e {dir}/R ]; do sleep 0.05; done; echo l > d/l"}]
  right:
    disks: [{key: "demo-shared", path: d}]
    steps: [{run: "touch {dir}/R; while [ ! -e {dir}/L ]; do sleep 0.05; done; echo r > d/r"}]
"""

GATED = """
name: demo
jobs:
  wait:
    steps: [{name: gate, run: "while [ ! -e {gate} ]; do sleep 0.05; done; echo released"}]
  after:
    needs: [wait]
    steps: [{run: "echo after"}]
"""


@dataclass(frozen=True)
class Site:
    """A server, a token that reads it, a runner pointed at it, and the runs it was fed."""

    server: Server
    token: str
    env: Env
    runs: dict[str, dict[str, Any]]  # failed, warm, races: their records


def run_pipeline(env: Env, text: str, name: str, *args: str) -> dict[str, Any]:
    f = env.root / f"{name}.yml"
    f.write_text(text)
    proc = env.run("run", str(f), "--json", "--sha", "feedc0de1234", *args, check=False)
    assert proc.stdout, proc.stderr
    record: dict[str, Any] = json.loads(proc.stdout)
    return record


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dash")
    with start_server(root / "server") as server:
        token = server.token("--write", "demo*")
        environ = {**os.environ, "STICKYCI_STORE": server.url, "STICKYCI_TOKEN": token,
                   "STICKYCI_CACHE_DIR": str(root / "cache")}
        env = Env(root, root / "unused", root / "cache", environ)
        sync = root / "sync"
        sync.mkdir()
        runs = {"failed": run_pipeline(env, PIPELINE.replace("{code}", "3"), "failed"),
                "warm": run_pipeline(env, PIPELINE.replace("{code}", "0"), "warm"),
                "races": run_pipeline(env, RACES.replace("{dir}", str(sync)), "races"),
                "cold": run_pipeline(env, PIPELINE.replace("{code}", "0"), "cold", "--cold")}
        assert [(r["state"], r["kind"]) for r in runs.values()] == [
            ("failure", "empty"), ("success", "warm"), ("success", "empty"), ("success", "cold")]
        yield Site(server, token, env, runs)


def test_runs_list_after_one_login_newest_first_with_failures_standing_out(
        site: Site, page: Page, tmp_path: Path) -> None:
    log_in(page, site.server.url, site.token)
    rows = page.locator("#runs tbody tr")
    ids = [r["id"] for r in site.runs.values()]
    expect(rows).to_have_count(len(ids))
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.run)") == ids[::-1]
    failed = page.locator(f"tr[data-run='{site.runs['failed']['id']}']")
    ok = page.locator(f"tr[data-run='{site.runs['warm']['id']}']")
    expect(failed).to_have_class("run state-failure has-failures")
    colour = "el => getComputedStyle(el).backgroundColor"
    assert failed.evaluate(colour) != ok.evaluate(colour)
    expect(failed.locator("td").nth(6)).to_have_text("1")  # one failed job
    # The cookie keeps the login: a new page of the same browser needs no token.
    other = page.context.new_page()
    other.goto(f"{site.server.url}/ui/runs")
    expect(other.locator("#runs tbody tr")).to_have_count(len(ids))
    screenshot(page, "dashboard-runs", tmp_path)


def test_runs_list_filters_by_pipeline_state_and_sha(site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.token)
    page.select_option("select[name=state]", "failure")
    page.click("form.filters button")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    expect(page.locator("#runs tbody tr")).to_have_attribute(
        "data-run", site.runs["failed"]["id"])
    page.select_option("select[name=state]", "")
    page.select_option("select[name=pipeline]", "demo-races")
    page.click("form.filters button")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    page.select_option("select[name=pipeline]", "")
    page.fill("input[name=sha]", "feedc0")
    page.click("form.filters button")
    expect(page.locator("#runs tbody tr")).to_have_count(len(site.runs))
    page.fill("input[name=sha]", "beef")
    page.click("form.filters button")
    expect(page.locator("#no-runs")).to_contain_text("No runs match these filters")


def test_a_runs_page_shows_its_timeline_critical_path_failing_step_and_log_tail(
        site: Site, page: Page, tmp_path: Path) -> None:
    run = site.runs["failed"]
    log_in(page, site.server.url, site.token)
    page.click(f"a[href='/ui/runs/{run['id']}']")
    expect(page.locator("#run-state")).to_have_text("failure")
    jobs = page.locator("#timeline tr.job")
    assert jobs.evaluate_all("rows => rows.map(r => r.dataset.job)") == [
        j["id"] for j in run["jobs"]]
    build = page.locator("#timeline tr[data-job='build']")
    # Each job split into its mount, its steps and its commit.
    expect(build.locator("rect.mount")).to_have_count(1)
    expect(build.locator("rect.step")).to_have_count(2)
    expect(build.locator("rect.commit")).to_have_count(1)
    expect(page.locator("#timeline tr[data-job='test'] rect.failed")).to_have_count(1)
    # test waited for build and ended last: that chain is the critical path, lint is not on it.
    critical = page.locator("#timeline tr.critical")
    assert critical.evaluate_all("rows => rows.map(r => r.dataset.job)") == ["build", "test"]
    # Bars are placed in time: test's step starts after build's commit ends.
    commit_end = build.locator("rect.commit").evaluate(
        "r => r.x.baseVal.value + r.width.baseVal.value")
    test_start = page.locator("#timeline tr[data-job='test'] rect.failed").evaluate(
        "r => r.x.baseVal.value")
    assert test_start >= commit_end - 0.01
    failure = page.locator("#failures .failure[data-job='test']")
    expect(failure.locator(".step-name")).to_have_text("unit")
    expect(failure.locator("pre.tail")).to_contain_text("FAILED test_add: 2 != 3")
    expect(page.locator("#disks td.start")).to_have_text(["empty"])
    screenshot(page, "dashboard-run", tmp_path)


def test_a_warm_run_shows_its_disk_cached_and_a_racing_run_its_race(
        site: Site, page: Page) -> None:
    log_in(page, site.server.url, site.token,
           f"/ui/runs/{site.runs['warm']['id']}")
    # The machine that committed the disk kept the committed tree as its base: no restore.
    expect(page.locator("#disks td.start")).to_have_text(["cached"])
    expect(page.locator(".facts")).to_contain_text("warm")
    expect(page.locator("#failures")).to_have_count(0)
    page.goto(f"{site.server.url}/ui/runs/{site.runs['races']['id']}")
    expect(page.locator("#races li")).to_have_count(1)
    expect(page.locator("#races li")).to_contain_text("disk demo-shared")
    expect(page.locator("#races li")).to_contain_text("last write wins")


def test_a_live_run_updates_without_a_reload(site: Site, page: Page, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    f = tmp_path / "gated.yml"
    f.write_text(GATED.replace("{gate}", str(gate)))
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(f), "-q"],
                            env=site.env.environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client = site.server.client(site.token)
    try:
        def running() -> bool:
            assert proc.poll() is None, proc.communicate()
            runs = client.get("/v1/runs?state=running").json()["runs"]
            return bool(runs) and client.get(f"/v1/runs/{runs[0]['id']}").json()[
                "record"]["jobs"][0]["state"] == "running"

        wait_for(running, "the gated run to be reported running")
        run_id = client.get("/v1/runs?state=running").json()["runs"][0]["id"]
        log_in(page, site.server.url, site.token, f"/ui/runs/{run_id}")
        expect(page.locator("#run-state")).to_have_text("running")
        expect(page.locator("#timeline tr[data-job='wait']")).to_have_attribute(
            "data-state", "running")
        expect(page.locator("#timeline tr[data-job='after']")).to_have_attribute(
            "data-state", "pending")
        page.evaluate("window.stillTheSamePage = true")
        gate.touch()
        expect(page.locator("#run-state")).to_have_text("success", timeout=30_000)
        expect(page.locator("#timeline tr[data-job='after']")).to_have_attribute(
            "data-state", "success")
        assert page.evaluate("window.stillTheSamePage") is True  # no reload happened
        expect(page.locator("#live")).to_have_attribute("data-live", "0")  # polling stopped
    finally:
        gate.touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_cold_against_warm_shows_each_jobs_medians_as_a_chart(
        site: Site, page: Page, tmp_path: Path) -> None:
    log_in(page, site.server.url, site.token, "/ui/compare?pipeline=demo")
    rows = page.locator("#compare tbody tr")
    cold, warm = site.runs["cold"], site.runs["warm"]  # one successful run of each kind
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.job)") == [
        *(j["id"] for j in cold["jobs"]), "total"]
    for job in cold["jobs"]:
        row = page.locator(f"#compare tr[data-job='{job['id']}']")
        expect(row.locator("td.cold")).to_have_text(duration(job["run_seconds"]))
        other = next(j for j in warm["jobs"] if j["id"] == job["id"])
        expect(row.locator("td.warm")).to_have_text(duration(other["run_seconds"]))
    total = page.locator("#compare tr[data-job='total']")
    expect(total.locator("td.cold")).to_have_text(duration(cold["seconds"]))
    # The longer bar belongs to the longer time.
    widths = [float(total.locator(f"rect.{k}").get_attribute("width") or 0)
              for k in ("cold", "warm")]
    assert (widths[0] > widths[1]) == (cold["seconds"] > warm["seconds"])
    screenshot(page, "dashboard-compare", tmp_path)
    # A pipeline without cold runs says what would make it comparable.
    page.select_option("select[name=pipeline]", "demo-races")
    page.click("form.filters button")
    expect(page.locator("#no-comparison")).to_contain_text("stickyci bench")
