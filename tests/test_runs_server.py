"""Runs reach the server: reported as they go by runs whose store is a stickyci server, pushed
afterwards from a ``file://`` store, kept per pipeline scope, validated at the boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import Env, one_line_error, wait_for
from server import Server, error, free_port, start_server

PIPELINE = """
name: demo
jobs:
  build:
    disks: [{key: "demo-out", path: out}]
    steps:
      - {name: compile, run: "head -c 3000 /dev/urandom > out/app.bin; echo compiled"}
  test:
    needs: [build]
    disks: [{key: "demo-out", path: o, commit: never}]
    steps:
      - {name: unit, run: "echo checking; echo 'assertion failed: 2 != 3' >&2; exit 4"}
"""

GATED = """
name: demo
jobs:
  wait:
    steps:
      - {name: gate, run: "while [ ! -e {gate} ]; do sleep 0.05; done; echo released"}
  after:
    needs: [wait]
    steps: [{run: "true"}]
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with start_server(tmp_path / "server") as s:
        yield s


def runner(env: Env, server: Server, token: str) -> Env:
    """``env`` whose store is ``server``, with ``token``."""
    return Env(env.root, env.store, env.cache, {**env.environ, "STICKYCI_STORE": server.url,
                                                 "STICKYCI_TOKEN": token})


def run_pipeline(env: Env, text: str, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                          dict[str, Any]]:
    f = env.root / "p.yml"
    f.write_text(text)
    proc = env.run("run", str(f), "--json", "--sha", "abc123def", *args, check=False)
    assert proc.stdout, proc.stderr
    return proc, json.loads(proc.stdout)


def report(run_id: str = "20261130-010203-abcdef", pipeline: str = "demo",
           **record: Any) -> dict[str, Any]:
    """A report as a runner sends it, by hand: what a hostile writer can send too."""
    doc = {"id": run_id, "pipeline": pipeline, "file": "p.yml", "sha": "abc", "cold": False,
           "state": "success", "started_at": 1.0, "finished_at": 2.0,
           "jobs": [{"id": "build", "job": "build", "state": "success",
                     "steps": [{"name": "compile", "state": "success"}]}]}
    doc.update(record)
    return {"record": doc, "tails": []}


def put(client: httpx2.Client, body: dict[str, Any]) -> httpx2.Response:
    return client.put(f"/v1/runs/{body['record']['id']}", json=body)


def test_a_run_on_a_server_reports_its_record_disks_failure_and_log_tail(
        env: Env, server: Server) -> None:
    token = server.token("--write", "demo*")
    proc, record = run_pipeline(runner(env, server, token), PIPELINE)
    assert proc.returncode == 1, proc.stderr
    got = server.client(token).get(f"/v1/runs/{record['id']}").json()
    sent = got["record"]
    # The final record is what the runner recorded locally, field for field.
    assert sent["state"] == "failure" == record["state"]
    assert sent["finished_at"] == record["finished_at"]
    assert [(j["id"], j["state"], j["started_at"], j["finished_at"]) for j in sent["jobs"]] == [
        (j["id"], j["state"], j["started_at"], j["finished_at"]) for j in record["jobs"]]
    build = sent["jobs"][0]
    assert build["steps"][0]["seconds"] > 0
    disk = build["disks"][0]
    assert disk["committed"] and disk["size"] == 3000 and disk["stored_bytes"] > 0
    assert disk["mount_seconds"] > 0 and disk["commit_seconds"] > 0
    # The failing step's log tail came along; the runner's token did not.
    tails = {(t["job"], t["step"]): t["text"] for t in got["tails"]}
    assert "assertion failed: 2 != 3" in tails[("test", 0)]
    assert "compiled" in tails[("build", 0)]
    assert token not in json.dumps(got)
    assert "cannot report" not in proc.stderr


def test_a_running_run_is_on_the_server_before_it_ends(env: Env, server: Server) -> None:
    token = server.token("--write", "demo")
    gate = env.root / "gate"
    f = env.root / "gated.yml"
    f.write_text(GATED.replace("{gate}", str(gate)))
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(f), "-q"],
                            env=runner(env, server, token).environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client = server.client(token)

    def jobs() -> list[dict[str, Any]]:
        """The jobs of the run the server lists, once it lists one."""
        assert proc.poll() is None, proc.communicate()
        runs = client.get("/v1/runs").json()["runs"]
        if not runs:
            return []
        assert runs[0]["state"] == "running"
        got: list[dict[str, Any]] = client.get(
            f"/v1/runs/{runs[0]['id']}").json()["record"]["jobs"]
        return got

    try:
        wait_for(lambda: any(j["state"] == "running" for j in jobs()),
                 "the server to show the job running")
        assert [j["state"] for j in jobs()] == ["running", "pending"]
        run_id = client.get("/v1/runs").json()["runs"][0]["id"]
        gate.touch()
        wait_for(lambda: client.get(f"/v1/runs/{run_id}").json()["record"]["state"]
                 == "success", "the server to show the run's end")
    finally:
        gate.touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_runs_push_sends_runs_recorded_on_a_file_store(env: Env, server: Server) -> None:
    first, _ = run_pipeline(env, PIPELINE)
    second, rec2 = run_pipeline(env, PIPELINE.replace("exit 4", "exit 0"))
    assert (first.returncode, second.returncode) == (1, 0)
    token = server.token("--write", "demo")
    pushing = {**env.environ, "STICKYCI_TOKEN": token}
    out = subprocess.run([sys.executable, "-m", "stickyci", "runs", "push", "--server",
                          server.url], env=pushing, capture_output=True, text=True, check=True)
    assert out.stdout.count("pushed run") == 2
    runs = server.client(token).get("/v1/runs").json()["runs"]
    assert [(r["state"], r["jobs"], r["failed"], r["kind"]) for r in runs] == [
        ("success", 2, 0, "warm"), ("failure", 2, 1, "empty")]  # newest first
    assert runs[0]["id"] == rec2["id"]
    failed = server.client(token).get(f"/v1/runs/{runs[1]['id']}").json()
    assert any("assertion failed" in t["text"] for t in failed["tails"])
    # Filters: by state, by a prefix of the sha, by pipeline.
    client = server.client(token)
    assert [r["id"] for r in client.get("/v1/runs?state=success").json()["runs"]] == [
        rec2["id"]]
    assert len(client.get("/v1/runs?sha=ABC1").json()["runs"]) == 2
    assert client.get("/v1/runs?sha=abd").json()["runs"] == []
    assert client.get("/v1/runs?pipeline=other").json()["runs"] == []


def test_a_push_outside_the_tokens_scope_fails_with_one_line(env: Env, server: Server) -> None:
    run_pipeline(env, PIPELINE)
    token = server.token("--write", "other-*")
    out = subprocess.run([sys.executable, "-m", "stickyci", "runs", "push", "latest",
                          "--server", server.url], env={**env.environ, "STICKYCI_TOKEN": token},
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "may not write runs of pipeline 'demo'" in one_line_error(out)
    assert server.client().get("/v1/runs").json()["runs"] == []
    out = subprocess.run([sys.executable, "-m", "stickyci", "runs", "push"], env=env.environ,
                         capture_output=True, text=True)
    assert "is not a stickyci server" in one_line_error(out)  # STICKYCI_STORE is file://


def test_a_server_that_is_down_is_logged_once_and_the_run_goes_on(env: Env) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    e = Env(env.root, env.store, env.cache, {**env.environ, "STICKYCI_STORE": down,
                                             "STICKYCI_TOKEN": "sci_x_y"})
    proc, record = run_pipeline(e, GATED.replace("{gate}", "/"))
    assert proc.returncode == 0 and record["state"] == "success"
    assert proc.stderr.count("cannot report run") == 1, proc.stderr
    assert f"stickyci runs push {record['id']}" in proc.stderr


# Attacks: every writer is hostile; scopes hold.

def test_a_token_writes_and_reads_only_the_runs_of_pipelines_its_patterns_cover(
        server: Server) -> None:
    demo = server.client(server.token("--write", "demo"))
    other = server.client(server.token("--write", "other*"))
    reader = server.client(server.token("--read", "other*"))
    assert put(demo, report()).status_code == 204
    r = put(other, report(run_id="20261130-010203-000002"))
    assert r.status_code == 403 and "runs of pipeline 'demo'" in error(r).error
    assert put(other, report(run_id="20261130-010203-000003", pipeline="other-x")
               ).status_code == 204
    assert put(reader, report(run_id="20261130-010203-000004", pipeline="other-y")
               ).status_code == 403
    # Reading: a run the token may not read is not found, exactly as one that is not there.
    assert [r["pipeline"] for r in reader.get("/v1/runs").json()["runs"]] == ["other-x"]
    hidden = reader.get("/v1/runs/20261130-010203-abcdef")
    missing = reader.get("/v1/runs/20261130-010203-ffffff")
    assert hidden.status_code == missing.status_code == 404
    assert reader.get("/v1/runs?pipeline=demo").json()["runs"] == []
    assert [r["pipeline"] for r in server.client().get("/v1/runs").json()["runs"]] == [
        "demo", "other-x"]


def test_a_token_cannot_overwrite_another_pipelines_run_by_its_id(server: Server) -> None:
    demo = server.client(server.token("--write", "demo"))
    other = server.client(server.token("--write", "other"))
    assert put(demo, report()).status_code == 204
    r = put(other, report(pipeline="other", state="failure"))
    assert r.status_code == 403 and "runs of pipeline 'demo'" in error(r).error
    kept = demo.get("/v1/runs/20261130-010203-abcdef").json()["record"]
    assert (kept["pipeline"], kept["state"]) == ("demo", "success")


def test_runs_need_a_token_and_anonymous_read_only_reads(tmp_path: Path) -> None:
    with start_server(tmp_path / "s", args=["--anonymous-read"]) as s:
        assert put(s.client(), report()).status_code == 204
        anon = httpx2.Client(base_url=s.url)
        assert [r["id"] for r in anon.get("/v1/runs").json()["runs"]] == [
            "20261130-010203-abcdef"]
        assert put(anon, report(run_id="20261130-010203-000009")).status_code == 401
    with start_server(tmp_path / "t") as t:
        r = httpx2.get(f"{t.url}/v1/runs")
        assert r.status_code == 401 and "needs a token" in error(r).error


@pytest.mark.parametrize(("body", "says"), [
    (report(run_id="../../etc"), "run id"),
    (report(state="<b>done</b>"), "run state"),
    (report(pipeline=" "), "pipeline name"),
    (report(jobs=[{"id": 3, "job": "x"}]), "record.jobs.0.id"),
    (report(jobs=[{"id": "a", "job": "a", "state": "owned"}]), "unknown state"),
    (report(jobs=[{"id": "a", "job": "a"}, {"id": "a", "job": "a"}]), "appears twice"),
    (report(started_at="yesterday"), "record.started_at"),
    ({"record": report()["record"], "tails": [{"job": "build", "step": 5, "text": "x"}]},
     "no such step"),
    ({"record": report()["record"], "tails": [{"job": "build", "step": 0, "text": "x" * 9000}]},
     "tails.0.text"),
    ({"tails": []}, "record"),
])
def test_an_invalid_report_is_refused_naming_the_field(srv: Server, body: dict[str, Any],
                                                       says: str) -> None:
    run_id = body.get("record", {}).get("id", "20261130-010203-abcdef")
    r = srv.client().put(f"/v1/runs/{run_id.replace('/', '_')}", json=body)
    assert r.status_code == 400, r.text
    assert says in error(r).error


def test_a_report_under_another_id_or_too_large_is_refused(srv: Server) -> None:
    client = srv.client()
    r = client.put("/v1/runs/20261130-010203-000000", json=report())
    assert r.status_code == 400 and "sent to" in error(r).error
    big = report(run_id="20261130-010203-000001", file="x" * (9 << 20))
    r = put(client, big)
    assert r.status_code == 413
    assert client.get("/v1/runs/20261130-010203-000001").status_code == 404
