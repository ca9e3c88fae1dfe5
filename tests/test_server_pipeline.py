"""Pipelines whose disks live on a stickyci server: every runner command over ``http://``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Env
from server import Server, start_server

PIPELINE = """
jobs:
  build:
    disks: [{key: "pr-7-out-${{ sha }}", path: out}]
    steps: [{run: "echo built-by-build > out/app.bin"}]
  deploy:
    needs: [build]
    disks: [{key: "pr-7-out-${{ sha }}", path: a, commit: never}]
    steps: [{run: "grep built-by-build a/app.bin"}]
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with start_server(tmp_path / "server") as s:
        yield s


def run(env: Env, pipeline: str, token: str, *args: str) -> tuple[int, dict[str, Any]]:
    f = env.root / "p.yml"
    f.write_text(pipeline)
    env.environ["STICKYCI_TOKEN"] = token
    proc = env.run("run", str(f), "--json", *args, check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_a_pipeline_hands_off_through_the_server_with_a_scoped_token(
        env: Env, server: Server) -> None:
    token = server.token("--read", "main-*", "--write", "pr-7-*")
    env.environ["STICKYCI_STORE"] = server.url
    code, record = run(env, PIPELINE, token, "--sha", "abc123")
    assert code == 0, record
    # The disk is on the server, not in the runner's default store.
    assert [d["key"] for d in server.client().get("/v1/disks").json()["disks"]] == [
        "pr-7-out-abc123"]
    assert not env.store.exists()
    # The token's secret reached neither the run's logs nor its record.
    run_dir = Path(record["run_dir"])
    assert all(token not in p.read_text() for p in run_dir.rglob("*") if p.is_file())


def test_a_commit_outside_the_tokens_scope_fails_the_job_with_one_line(
        env: Env, server: Server) -> None:
    token = server.token("--read", "*", "--write", "pr-8-*")
    env.environ["STICKYCI_STORE"] = server.url
    code, record = run(env, PIPELINE, token, "--sha", "abc123")
    assert code != 0
    build = next(j for j in record["jobs"] if j["id"] == "build")
    assert build["state"] == "failure"
    disk = build["disks"][0]
    assert "may not write refs/pr-7-out-abc123" in disk["error"]
    assert "\n" not in disk["error"]
    assert server.client().get("/v1/disks").json()["disks"] == []


def test_a_cold_run_stays_inside_the_tokens_scope_and_cleans_up(env: Env, server: Server) -> None:
    token = server.token("--write", "pr-7-*", "--delete", "pr-7-*")
    env.environ["STICKYCI_STORE"] = server.url
    code, record = run(env, PIPELINE, token, "--sha", "abc123", "--cold")
    assert code == 0, record
    # The run's private copies lived under pr-7-… and were removed at the end.
    assert server.client().get("/v1/disks").json()["disks"] == []
