"""The canonical example, end to end: a cold run builds the deps once, a warm run rebuilds none."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import DEPS_FILES, Env, deps_objects
from server import start_server

PIPELINE = Path(__file__).parent.parent / "examples" / "monorepo" / "pipeline.yml"


def _run(env: Env, *args: str) -> dict[str, Any]:
    proc = env.run("run", str(PIPELINE), "--json", "--sha", "t1", "--set",
                   "services=services.small.json", "--set", f"deps_files={DEPS_FILES}", *args,
                   check=False)
    record: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == 0, (record["state"], [(j["id"], j["reason"]) for j in
                                                    record["jobs"]])
    return record


def _log(record: dict[str, Any], job_id: str) -> str:
    job = next(j for j in record["jobs"] if j["id"] == job_id)
    return "".join((Path(record["run_dir"]) / s["log"]).read_text()
                   for s in job["steps"] if s["log"])


def _compiled(record: dict[str, Any], job_id: str) -> int:
    """Dependency objects compiled by a job, counted from its build log."""
    return len(re.findall(r"^CC obj/", _log(record, job_id), re.M))


def test_cold_then_warm(env: Env) -> None:
    cold = _run(env)
    ids = [j["id"] for j in cold["jobs"]]
    assert ids == ["warm-deps", "build[gateway,8080]", "build[auth,8081]",
                   "build[inventory,8086]", "deploy[gateway,8080]", "deploy[auth,8081]",
                   "deploy[inventory,8086]"]
    assert _compiled(cold, "warm-deps") == deps_objects(DEPS_FILES)
    # The build matrix reused what warm-deps committed in the same run.
    assert all(_compiled(cold, i) == 0 for i in ids if i.startswith("build"))

    warm = _run(env)
    assert all(_compiled(warm, i) == 0 for i in ids)
    deps = next(j for j in warm["jobs"] if j["id"] == "warm-deps")["disks"][0]
    assert not deps["fresh"] and not deps["committed"]  # nothing changed: no new generation
    assert warm["seconds"] < cold["seconds"]
    keys = {d["key"] for d in env.json("disk", "ls")}
    assert "monorepo-example-deps" in keys
    assert "monorepo-example-handoff-gateway-t1" in keys
    summary = (Path(warm["run_dir"]) / "summary.md").read_text()
    assert "warm-deps" in summary


def _remote_cache(record: dict[str, Any], job_id: str) -> tuple[int, int]:
    """(hits, writes) that the job's ccache reported for the remote cache."""
    m = re.search(r"^remote cache: (\d+) hits, (\d+) writes$", _log(record, job_id), re.M)
    assert m, _log(record, job_id)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(shutil.which("ccache") is None, reason="ccache is not installed")
def test_a_remote_cache_is_the_fallback_when_the_disk_is_cold(env: Env, tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as server:
        env.environ["STICKYCI_TOKEN"] = server.token("--write", "*")
        args = ("--cold", "--only", "warm-deps", "--set", f"cache={server.url}")
        first = _run(env, *args)
        objects = _compiled(first, "warm-deps")
        hits, writes = _remote_cache(first, "warm-deps")
        assert objects == deps_objects(DEPS_FILES) and hits == 0 and writes >= objects
        # Cold again: the disk starts empty, but every object comes back from the server.
        second = _run(env, *args)
        hits, writes = _remote_cache(second, "warm-deps")
        assert hits >= objects and writes == 0
        assert second["seconds"] < first["seconds"]
