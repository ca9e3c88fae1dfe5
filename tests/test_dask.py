"""The Dask executor on a real cluster: a LocalCluster of 3 worker processes, 1 thread each.

Every worker has its own STICKYCI_CACHE_DIR (base cache and job workspaces), as if it were a
machine of its own; all of them share one store. ``stickyci run --executor dask`` runs as a
real client process against the cluster's scheduler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distributed
import pytest
from helpers import DEPS_FILES, Env, deps_objects, names, unmount_under, wait_for
from server import start_server

EXAMPLE = Path(__file__).parent.parent / "examples" / "monorepo" / "pipeline.yml"
WORKERS = 3
# A step on a cluster of fresh worker processes may take a while to start on a busy machine.
CLUSTER_WAIT = 60.0
@dataclass
class Store:
    """The shared store: its URL, the token clients send, the directory holding its data."""

    url: str
    token: str
    data: Path


@dataclass
class Cluster:
    """The running cluster and a client of it for the test itself."""

    address: str
    client: Any  # distributed.Client
    caches: dict[str, Path]  # worker name → its STICKYCI_CACHE_DIR

    def workers(self) -> dict[str, str]:
        """Worker name → its address now (a restarted worker keeps its name, not its port)."""
        info = self.client.scheduler_info()["workers"]
        return {str(w["name"]): addr for addr, w in info.items()}

    def pid(self, address: str) -> int:
        """The process id of the worker at ``address``."""
        pid: int = self.client.run(os.getpid, workers=[address])[address]
        return pid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The shared store every worker and every client of this module uses."""
    root = tmp_path_factory.mktemp("store")
    # A stickyci server, as on a real cluster; runners get a token that may write and remove
    # disks (a cold run removes its private copies), not an admin one.
    with start_server(root) as server:
        yield Store(server.url, server.token("--write", "*", "--delete", "*"), root / "store")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A LocalCluster of 3 worker processes with a cache directory each (``w2``: cpu=4)."""
    root = tmp_path_factory.mktemp("cluster")
    lc = distributed.LocalCluster(n_workers=0, processes=True, threads_per_worker=1,
                                  dashboard_address=":0", silence_logs=logging.CRITICAL)
    caches = {f"w{i}": root / f"w{i}" for i in range(WORKERS)}
    for i, (name, cache) in enumerate(caches.items()):
        # A store set on the worker must lose to the one the client passes with each job.
        env = {"STICKYCI_CACHE_DIR": str(cache), "STICKYCI_STORE": f"file://{root}/not-this"}
        lc.worker_spec[name] = {"cls": distributed.Nanny, "options": {
            **lc.new_spec["options"], "env": env, "memory_limit": 0,
            "resources": {"cpu": 4 if i == WORKERS - 1 else 2}}}
    lc.scale(WORKERS)
    client = distributed.Client(lc)
    try:
        client.wait_for_workers(WORKERS, timeout=60)
        yield Cluster(lc.scheduler_address, client, caches)
    finally:
        client.close()
        lc.close()
        unmount_under(root)


@pytest.fixture
def env(tmp_path: Path, store: Store, cluster: Cluster) -> Iterator[Env]:
    """A client's environment: its own cache dir (run dirs, history), the shared store."""
    # A worker killed by an earlier test has been restarted by its nanny; wait for it.
    cluster.client.wait_for_workers(WORKERS, timeout=60)
    environ = {**os.environ, "STICKYCI_STORE": store.url,
               "STICKYCI_CACHE_DIR": str(tmp_path / "client")}
    environ["STICKYCI_TOKEN"] = store.token
    yield Env(tmp_path, store.data, tmp_path / "client", environ)
    unmount_under(tmp_path)


def write(env: Env, text: str, name: str = "p.yml") -> Path:
    f = env.root / name
    f.write_text(text)
    return f


def dask_args(cluster: Cluster) -> tuple[str, ...]:
    return ("--executor", "dask", "--scheduler", cluster.address)


def run(env: Env, cluster: Cluster, pipeline: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = env.run("run", str(pipeline), "--json", *dask_args(cluster), *args, check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def start(env: Env, cluster: Cluster, pipeline: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(pipeline), "--json",
                             *dask_args(cluster)], env=env.environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def jobs(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in record["jobs"]}


def job_log(record: dict[str, Any], job_id: str) -> str:
    job = jobs(record)[job_id]
    return "".join((Path(record["run_dir"]) / s["log"]).read_text()
                   for s in job["steps"] if s["log"])


def ran_on(record: dict[str, Any], job_id: str) -> str:
    """The name of the worker that ran the last attempt of a job."""
    name: str = jobs(record)[job_id]["attempts"][-1]["worker_name"]
    return name


def gone(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True


def mounted_under(root: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].startswith(str(root)) for line in f)


# --- the canonical example ---------------------------------------------------------------------

def test_example_runs_green_on_the_cluster(env: Env, cluster: Cluster) -> None:
    example = ("--sha", "t1", "--set", "services=services.small.json",
               "--set", f"deps_files={DEPS_FILES}")
    code, cold = run(env, cluster, EXAMPLE, *example)
    assert code == 0, [(j["id"], j["state"], j["reason"]) for j in cold["jobs"]]
    ids = list(jobs(cold))
    assert ids == ["warm-deps", "build[gateway,8080]", "build[auth,8081]",
                   "build[inventory,8086]", "deploy[gateway,8080]", "deploy[auth,8081]",
                   "deploy[inventory,8086]"]
    # The logs streamed back from the workers are complete: every compile line is there.
    compiled = len(re.findall(r"^CC obj/", job_log(cold, "warm-deps"), re.M))
    assert compiled == deps_objects(DEPS_FILES)
    assert all("deps objects compiled: 0" in job_log(cold, i) for i in ids[1:4])
    # The fan-out spreads: three builds ready at once on three idle workers.
    assert {ran_on(cold, i) for i in ids[1:4]} == {"w0", "w1", "w2"}
    assert all(len(j["attempts"]) == 1 and j["attempts"][0]["state"] == "success"
               for j in cold["jobs"])
    # Each worker restored the deps disk into its own base cache (but warm-deps's, when its
    # commit left the base there: copy mounts, without root), and left no workspace.
    restored = [not d["base_cached"] for i in ids[1:4] for d in jobs(cold)[i]["disks"]
                if d["key"] == "monorepo-example-deps"]
    assert sum(restored) >= 2
    for cache in cluster.caches.values():
        assert len([p for p in (cache / "bases").iterdir() if p.suffix == ".json"]) >= 2
        assert not any((cache / "jobs").glob("*/*")), list((cache / "jobs").glob("*/*"))
    assert not (Path(cold["run_dir"]) / "ws").exists()  # nothing ran on the client

    code, warm = run(env, cluster, EXAMPLE, *example)
    assert code == 0, [(j["id"], j["state"], j["reason"]) for j in warm["jobs"]]
    assert "deps objects compiled: 0" in job_log(warm, "warm-deps")
    for i in ids[1:4]:
        deps = next(d for d in jobs(warm)[i]["disks"] if d["key"] == "monorepo-example-deps")
        assert deps["base_cached"], i  # every worker kept its base from the cold run
    # The reports and the history are those of a local run.
    summary = (Path(warm["run_dir"]) / "summary.md").read_text()
    assert "# monorepo: SUCCESS" in summary and "## Attempts" in summary
    assert all(addr in summary for addr in cluster.workers().values())
    shown = env.json("runs", "show", warm["id"])
    assert shown["state"] == "success" and shown["executor"] == "dask"
    assert shown["jobs"][0]["attempts"][0]["worker"].startswith("tcp://")
    keys = {d["key"] for d in env.json("disk", "ls")}
    assert {"monorepo-example-deps", "monorepo-example-handoff-gateway-t1"} <= keys


# --- faults -------------------------------------------------------------------------------------

def test_a_worker_killed_mid_job_is_retried_on_another(env: Env, cluster: Cluster) -> None:
    m = env.root / "m"
    m.mkdir()
    p = write(env, f"""
name: kill
jobs:
  victim:
    retries: 1
    disks: [{{key: victim-out, path: out}}]
    steps:
      - name: work
        run: |
          echo "attempt $STICKYCI_ATTEMPT on $STICKYCI_WORKER"
          echo "$STICKYCI_ATTEMPT $STICKYCI_WORKER" > out/result
          if [ "$STICKYCI_ATTEMPT" = 1 ]; then
            echo $$ > {m}/step.pid
            echo "$STICKYCI_WORKER" > {m}/worker.tmp && mv {m}/worker.tmp {m}/worker
            exec sleep 600
          fi
  check:
    needs: [victim]
    disks: [{{key: victim-out, path: got, commit: never}}]
    steps: [{{run: 'grep "^2 " got/result'}}]
""")
    proc = start(env, cluster, p)
    try:
        wait_for(lambda: proc.poll() is not None or (m / "worker").exists(),
                 "the first attempt to start its step", timeout=CLUSTER_WAIT)
        victim = (m / "worker").read_text().strip()
        # What the step printed before its worker dies is kept: wait until it is here.
        wait_for(lambda: any(f"attempt 1 on {victim}" in f.read_text() for f in (
            env.cache / "runs").glob("*/logs/victim/01-work.log")), "the step's output",
            timeout=CLUSTER_WAIT)
        os.kill(cluster.pid(victim), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err
    record = json.loads(out)
    first, second = jobs(record)["victim"]["attempts"]
    assert (first["attempt"], first["worker"], first["state"]) == (1, victim, "lost")
    assert "died" in first["reason"]
    assert (second["attempt"], second["state"]) == (2, "success")
    assert second["worker"] != victim
    assert jobs(record)["check"]["state"] == "success"
    # The step of the lost attempt died with its worker, and only attempt 2 committed.
    wait_for(lambda: gone(int((m / "step.pid").read_text())), "the lost step to be killed",
             timeout=10)
    assert [g["gen"] for g in env.json("disk", "show", "victim-out")["generations"]] == [1]
    # Both attempts are in the summary with their workers, and both logs came back.
    summary = (Path(record["run_dir"]) / "summary.md").read_text()
    assert re.search(rf"\| victim \| 1 \| {re.escape(victim)} \(w\d\) \| lost \|", summary)
    assert re.search(rf"\| victim \| 2 \| {re.escape(second['worker'])} \(w\d\) \| ok \|",
                     summary)
    logs = Path(record["run_dir"]) / "logs"
    assert f"attempt 1 on {victim}" in (logs / "victim" / "01-work.log").read_text()
    assert "attempt 2 on" in (logs / "victim.attempt-2" / "01-work.log").read_text()

    # The dead attempt left its workspace and its mount in that worker's cache; its restarted
    # successor clears them when it runs a job (`check` may have been one already; the next
    # one is sent there by a disk only its base cache holds).
    cache = cluster.caches[first["worker_name"]]
    stale = cache / "jobs" / record["id"] / "0-victim.1"
    seed(env, "sweep-probe", "x")
    warm_up(env, cache, "sweep-probe")
    p = write(env, "jobs:\n  next:\n    disks: [{key: sweep-probe, path: d, commit: never}]\n"
                   "    steps: [{run: 'true'}]\n", "next.yml")
    code, after = run(env, cluster, p)
    assert code == 0 and ran_on(after, "next") == first["worker_name"]
    assert not stale.exists() and not mounted_under(stale)


def test_a_commit_killed_with_its_worker_never_moves_the_ref(env: Env, cluster: Cluster
                                                             ) -> None:
    m = env.root / "m"
    m.mkdir()
    p = write(env, f"""
name: kill-commit
jobs:
  big:
    disks: [{{key: big-out, path: out}}]
    steps:
      - run: |
          if [ "$STICKYCI_ATTEMPT" = 1 ]; then
            # incompressible, so the commit writes packs for a while
            head -c 160M /dev/urandom > out/big.bin
            echo "$STICKYCI_WORKER" > {m}/worker.tmp && mv {m}/worker.tmp {m}/worker
          else
            echo small > out/small
          fi
""")
    before = names(env.store, "packs") | names(env.store, "tmp")
    proc = start(env, cluster, p)
    try:
        wait_for(lambda: proc.poll() is not None or (
            (m / "worker").exists()
            and names(env.store, "packs") | names(env.store, "tmp") != before),
            "the first attempt's commit to start writing", timeout=CLUSTER_WAIT)
        victim = (m / "worker").read_text().strip()
        os.kill(cluster.pid(victim), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err
    job = jobs(json.loads(out))["big"]
    assert [a["state"] for a in job["attempts"]] == ["lost", "success"], \
        "the commit finished before its worker could be killed"
    disk = job["disks"][0]
    assert disk["committed"] and disk["generation"] == 1 and disk["raced_with"] == []
    # The ref holds attempt 2's tree only: the killed commit moved nothing, then or later.
    shown = env.json("disk", "show", "big-out")
    assert [g["gen"] for g in shown["generations"]] == [1]
    here = env.root / "here"
    env.run("disk", "mount", "big-out", str(here))
    assert sorted(p.name for p in here.iterdir()) == ["small"]
    env.run("disk", "unmount", str(here))


# --- placement ---------------------------------------------------------------------------------

def seed(env: Env, key: str, content: str) -> None:
    """Commit a disk holding one file, from the client's machine."""
    d = env.root / f"seed-{key}"
    env.run("disk", "mount", key, str(d))
    (d / "who").write_text(content)
    env.run("disk", "commit", str(d))


def warm_up(env: Env, cache: Path, key: str) -> None:
    """Materialise the latest snapshot of ``key`` in one worker's base cache."""
    there = Env(env.root, env.store, cache, {**env.environ, "STICKYCI_CACHE_DIR": str(cache)})
    d = env.root / f"warm-{cache.name}-{key}"
    mounted = there.json("disk", "mount", key, str(d))
    assert not mounted["base_cached"]
    there.run("disk", "unmount", str(d))


def test_placement_prefers_the_warm_worker_and_never_waits_for_it(env: Env,
                                                                   cluster: Cluster) -> None:
    for i, (name, cache) in enumerate(cluster.caches.items()):
        seed(env, f"place-{i}", name)
        warm_up(env, cache, f"place-{i}")
    # Three jobs ready at once, each mounting a disk one worker holds: each goes there.
    p = write(env, "jobs:\n" + "".join(
        f"  j{i}:\n    disks: [{{key: place-{i}, path: d, commit: never}}]\n"
        f"    steps: [{{run: cat d/who}}]\n" for i in range(WORKERS)))
    code, record = run(env, cluster, p)
    assert code == 0
    for i in range(WORKERS):
        assert ran_on(record, f"j{i}") == f"w{i}"
        assert jobs(record)[f"j{i}"]["disks"][0]["base_cached"]

    # Two jobs want w0's disk at once; the second starts elsewhere instead of queueing there.
    # Each waits for the other, so a job queued behind its sibling would time out.
    m = env.root / "m"
    m.mkdir()
    rendezvous = ("touch {m}/{me}; for i in $(seq 600); do [ -e {m}/{other} ] && exit 0; "
                  "sleep 0.05; done; exit 1")
    p = write(env, "jobs:\n" + "".join(
        f"  {me}:\n    disks: [{{key: place-0, path: d, commit: never}}]\n"
        f"    steps: [{{run: '{rendezvous.format(m=m, me=me, other=other)}'}}]\n"
        for me, other in (("a", "b"), ("b", "a"))))
    code, record = run(env, cluster, p)
    assert code == 0, [j["reason"] for j in record["jobs"]]
    assert sorted(ran_on(record, j) == "w0" for j in "ab") == [False, True]

    # Resources beat warmth: only w2 offers cpu=4.
    p = write(env, "jobs:\n  big:\n    resources: {cpu: 4}\n"
                   "    disks: [{key: place-0, path: d, commit: never}]\n"
                   "    steps: [{run: 'true'}]\n")
    code, record = run(env, cluster, p)
    assert code == 0 and ran_on(record, "big") == "w2"


# --- logs, secrets, cancellation, errors -------------------------------------------------------

def test_logs_stream_back_while_the_job_runs_and_secrets_stay_masked(env: Env,
                                                                     cluster: Cluster) -> None:
    m = env.root / "m"
    m.mkdir()
    env.environ["DEPLOY_KEY"] = "hunter2-very-secret"
    token = env.environ.setdefault("STICKYCI_TOKEN", "token-from-the-client-0042")
    p = write(env, f"""
secrets: [DEPLOY_KEY]
jobs:
  talk:
    steps:
      - name: talk
        run: |
          echo "first line key=$DEPLOY_KEY token=$STICKYCI_TOKEN"
          touch {m}/said
          while [ ! -e {m}/go ]; do sleep 0.05; done
          echo "last line"
""")
    proc = start(env, cluster, p)
    try:
        wait_for(lambda: proc.poll() is not None or (m / "said").exists(), "the first line",
                 timeout=CLUSTER_WAIT)
        logs = (env.cache / "runs").glob
        wait_for(lambda: any("first line" in f.read_text()
                             for f in logs("*/logs/talk/01-talk.log")),
                 "the first line to reach the client's run dir", timeout=CLUSTER_WAIT)
        assert proc.poll() is None  # streamed while the job still runs
        (m / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err
    text = job_log(json.loads(out), "talk")
    assert text == "first line key=*** token=***\nlast line\n"
    assert "hunter2" not in out + err and token not in out + err


def test_sigint_cancels_the_jobs_on_the_workers(env: Env, cluster: Cluster) -> None:
    started, torn = env.root / "started", env.root / "torn"
    p = write(env, f"""
jobs:
  long:
    disks: [{{key: cancelled-on-dask, path: d}}]
    steps:
      - {{name: work, run: "echo data > d/f; touch {started}; sleep 300"}}
      - {{name: teardown, if: always(), run: "touch {torn}"}}
  after: {{needs: [long], steps: [{{run: "true"}}]}}
""")
    proc = start(env, cluster, p)
    try:
        wait_for(lambda: proc.poll() is not None or started.exists(), "the step to start",
                 timeout=CLUSTER_WAIT)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 130, err
    j = jobs(json.loads(out))
    assert j["long"]["state"] == "cancelled" and j["after"]["state"] == "cancelled"
    assert [s["state"] for s in j["long"]["steps"]] == ["cancelled", "success"]
    assert torn.exists()
    assert "cancelled-on-dask" not in {d["key"] for d in env.json("disk", "ls")}


def test_a_cold_run_hands_off_and_leaves_no_disk(env: Env,
                                                   cluster: Cluster) -> None:
    p = write(env, """
jobs:
  make: {disks: [{key: cold-handoff, path: out}], steps: [{run: "echo built > out/bin"}]}
  use:
    needs: [make]
    disks: [{key: cold-handoff, path: in, commit: never}]
    steps: [{run: "grep built in/bin"}]
""")
    code, record = run(env, cluster, p, "--cold")
    assert code == 0, [j["reason"] for j in record["jobs"]]
    assert jobs(record)["make"]["disks"][0]["fresh"]
    # Neither the key (never committed in a cold run) nor the run's private copy is left.
    assert [d["key"] for d in env.json("disk", "ls") if d["key"].startswith("cold-handoff")] == []


def test_bad_executor_settings_are_one_line_errors(env: Env, cluster: Cluster) -> None:
    marker = env.root / "ran"
    p = write(env, f"jobs:\n  a: {{steps: [{{run: 'touch {marker}'}}]}}\n")
    cases: list[tuple[tuple[str, ...], str]] = [
        (("--scheduler", cluster.address), "--scheduler is for the Dask executor"),
        (("--connect-timeout", "30s"), "--connect-timeout is for the Dask executor"),
        (("--executor", "dask"), "needs its scheduler"),
        ((*dask_args(cluster), "--connect-timeout", "0s"),
         "--connect-timeout '0s': must be a positive duration"),
        ((*dask_args(cluster), "--connect-timeout", "5"),
         "--connect-timeout '5': use a number and one of"),
    ]
    for args, message in cases:
        proc = env.run("run", str(p), *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    # The timeout the command line gives, else the file's, is how long the client tries.
    with socket_nobody_listens_on() as port:
        address = f"tcp://127.0.0.1:{port}"
        in_file = write(env, f"executor: dask\nscheduler: {address}\nconnect_timeout: 2\n"
                             f"jobs:\n  a: {{steps: [{{run: 'touch {marker}'}}]}}\n", "ct.yml")
        proc = env.run("run", str(in_file), "--connect-timeout", "1s", check=False)
        from_file = env.run("run", str(in_file), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"stickyci: error: cannot reach the Dask scheduler at "
                                  f"{address}")
    assert "dask scheduler" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "after 1 s" in proc.stderr, proc.stderr
    assert from_file.returncode == 2 and "after 2 s" in from_file.stderr, from_file.stderr

    gpu = write(env, f"jobs:\n  a:\n    resources: {{gpu: 1}}\n"
                     f"    steps: [{{run: 'touch {marker}'}}]\n", "gpu.yml")
    proc = env.run("run", str(gpu), *dask_args(cluster), check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stickyci: error:")]
    assert len(lines) == 1 and "jobs.a.resources: no worker offers gpu=1" in lines[0]
    assert not marker.exists()


def test_a_scheduler_without_workers_fails_once_the_connect_timeout_is_over(env: Env) -> None:
    marker = env.root / "ran"
    p = write(env, f"jobs:\n  a: {{steps: [{{run: 'touch {marker}'}}]}}\n")
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp://",
                                  dashboard_address=":0", silence_logs=logging.CRITICAL) as empty:
        address = empty.scheduler_address
        proc = env.run("run", str(p), "--executor", "dask", "--scheduler", address,
                       "--connect-timeout", "1s", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"stickyci: error: the Dask scheduler at {address} has no workers after 1s; start "
        f"some with `dask worker {address}`, or wait longer with --connect-timeout")
    assert not marker.exists()


@contextlib.contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    """A port that is bound (so nobody else takes it) but not listening: connects are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
