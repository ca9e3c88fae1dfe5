"""The Nix example end to end, with the real nix-daemon and ``stickyci serve`` as its binary cache.

A smaller variant of the example (one kernel per library, one service) so that its three runs
fit in CI: cold (nothing on the disk: the closure is compiled, then pushed to the cache), warm
(the /nix disk: nothing is built), and evicted (the disk removed: every path comes back from
the cache, nothing is compiled).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Env
from nix_helpers import NIX_DAEMON, public_key
from server import Server, start_server

pytestmark = [
    pytest.mark.root,  # a /nix disk keeps root-owned files; the chroot store builds sandboxed
    pytest.mark.skipif(NIX_DAEMON is None, reason="needs Nix (apt-get install nix-bin)"),
]

PIPELINE = Path(__file__).parent.parent / "examples" / "nix" / "pipeline.yml"
CACHE = "nix-example"
JOBS = ["warm-deps", "build[gateway,8080]", "deploy[gateway,8080]"]


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Server]:
    with start_server(tmp_path / "server") as server:
        subprocess.run([sys.executable, "-m", "stickyci", "nix", "key", "generate",
                        "--state-dir", str(server.state), CACHE], check=True,
                       capture_output=True)
        yield server


def _run(env: Env, server: Server) -> dict[str, Any]:
    proc = env.run("run", str(PIPELINE), "--json", "--sha", "t1",
                   "--set", "services=services.small.json", "--set", "kernels=1",
                   "--set", f"cache={server.url}/nix/{CACHE}",
                   "--set", f"cache_key={public_key(server.state, CACHE)}", check=False)
    record: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == 0, (record["state"], [(j["id"], j["reason"]) for j in
                                                    record["jobs"]])
    assert [j["id"] for j in record["jobs"]] == JOBS
    return record


def _log(record: dict[str, Any], job_id: str) -> str:
    job = next(j for j in record["jobs"] if j["id"] == job_id)
    return "".join((Path(record["run_dir"]) / s["log"]).read_text()
                   for s in job["steps"] if s["log"])


def _nix(record: dict[str, Any], job_id: str) -> tuple[int, int]:
    """(derivations built, paths fetched from the cache) as the job's nix-build reported them."""
    m = re.search(r"^derivations built: (\d+), paths fetched: (\d+)$", _log(record, job_id), re.M)
    assert m, _log(record, job_id)
    return int(m.group(1)), int(m.group(2))


def test_cold_warm_and_evicted_with_the_binary_cache(env: Env, cache: Server) -> None:
    env.environ["STICKYCI_TOKEN"] = cache.token("--write", f"{CACHE}*")
    cold = _run(env, cache)
    assert _nix(cold, "warm-deps") == (6, 0)  # five libraries and the sdk, compiled
    assert _nix(cold, "build[gateway,8080]") == (1, 0)  # only the service: its deps are warm
    assert "pushed 1 path(s)" in _log(cold, "build[gateway,8080]")
    assert re.search(r"^gateway ok port=8080 digest=[0-9a-f]{8}$",
                     _log(cold, "deploy[gateway,8080]"), re.M)
    for log in (_log(cold, "warm-deps"), _log(cold, "build[gateway,8080]")):
        assert re.search(r"nix-daemon \(pid \d+\) stopped", log)  # the always() teardown
    deps = next(j for j in cold["jobs"] if j["id"] == "warm-deps")["disks"][0]
    assert deps["committed"]

    warm = _run(env, cache)
    assert _nix(warm, "warm-deps") == (0, 0)  # the /nix disk has the whole closure
    assert _nix(warm, "build[gateway,8080]") == (0, 1)  # the same service, from the cache
    # The daemon leaves its directories' mtimes changed (socket, temporary roots, the
    # database's journal), so a warm run commits a generation, of a manifest and no content.
    warm_deps = next(j for j in warm["jobs"] if j["id"] == "warm-deps")["disks"][0]
    assert warm_deps["stored_bytes"] < deps["stored_bytes"] / 10
    changed = env.json("disk", "diff", "nix-example-nix")
    assert not changed["added"] and not changed["removed"] and not changed["modified"], changed
    assert warm["seconds"] < cold["seconds"] / 2

    env.run("disk", "rm", "nix-example-nix")  # evicted: the binary cache is the fallback
    evicted = _run(env, cache)
    built, fetched = _nix(evicted, "warm-deps")
    assert built == 0 and fetched == 6
    assert _nix(evicted, "build[gateway,8080]") == (0, 1)
    assert evicted["seconds"] < cold["seconds"]
