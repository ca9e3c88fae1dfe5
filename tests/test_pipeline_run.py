"""Running pipelines for real through ``stickyci run``: order, conditions, disks, signals."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import Env, wait_for


def write(env: Env, text: str, name: str = "p.yml") -> Path:
    f = env.root / name
    f.write_text(text)
    return f


def run(env: Env, pipeline: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = env.run("run", str(pipeline), "--json", *args, check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def jobs(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in record["jobs"]}


def log_text(record: dict[str, Any]) -> str:
    root = Path(record["run_dir"])
    return "".join(p.read_text() for p in sorted((root / "logs").rglob("*.log")))


def test_needs_order_and_concurrent_siblings(env: Env) -> None:
    # b and c each wait for the other's marker: they pass only if they really run together.
    m = env.root / "m"
    m.mkdir()
    rendezvous = ("touch {m}/{me}; for i in $(seq 200); do [ -e {m}/{other} ] && exit 0; "
                  "sleep 0.05; done; exit 1")
    p = write(env, f"""
jobs:
  a: {{steps: [{{run: "touch {m}/a"}}]}}
  b: {{needs: [a], steps: [{{run: "test -e {m}/a; {rendezvous.format(m=m, me='b', other='c')}"}}]}}
  c: {{needs: [a], steps: [{{run: "test -e {m}/a; {rendezvous.format(m=m, me='c', other='b')}"}}]}}
  d: {{needs: [b, c], steps: [{{run: "test -e {m}/b && test -e {m}/c"}}]}}
""")
    code, record = run(env, p)
    assert code == 0, record
    states = {k: j["state"] for k, j in jobs(record).items()}
    assert states == dict.fromkeys("abcd", "success")
    j = jobs(record)
    assert j["d"]["started_at"] >= max(j["b"]["finished_at"], j["c"]["finished_at"])


def test_max_parallel_one_never_overlaps(env: Env) -> None:
    p = write(env, """
jobs:
  t:
    matrix: {axes: {n: [1, 2, 3, 4]}}
    max_parallel: 1
    steps: [{run: "true"}]
""")
    code, record = run(env, p)
    assert code == 0
    # A skipped job has zero timestamps and overlaps nothing: all four must really have run.
    assert [j["state"] for j in record["jobs"]] == ["success"] * 4, record
    spans = sorted((j["started_at"], j["finished_at"]) for j in record["jobs"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_failure_skips_dependents_runs_teardown_and_failure_jobs(env: Env) -> None:
    p = write(env, """
jobs:
  build:
    steps:
      - {name: compile, run: "echo compiling; exit 3"}
      - {name: never, run: "echo should not run"}
      - {name: teardown, if: always(), run: "echo tearing down"}
      - {name: on failure, if: failure(), run: "echo failure seen"}
  deploy: {needs: [build], steps: [{run: "true"}]}
  notify: {needs: [build], if: failure(), steps: [{run: "echo notify"}]}
  cleanup: {needs: [deploy], if: always(), steps: [{run: "true"}]}
""")
    code, record = run(env, p)
    assert code == 1 and record["state"] == "failure"
    j = jobs(record)
    assert j["build"]["state"] == "failure"
    assert j["build"]["reason"] == "step 'compile' exited 3"
    assert [(s["name"], s["state"]) for s in j["build"]["steps"]] == [
        ("compile", "failure"), ("never", "skipped"), ("teardown", "success"),
        ("on failure", "success")]
    assert j["deploy"]["state"] == "skipped" and "build" in j["deploy"]["reason"]
    assert j["notify"]["state"] == "success"
    assert j["cleanup"]["state"] == "success"
    assert "should not run" not in log_text(record)


def test_continue_on_error_keeps_the_job_green(env: Env) -> None:
    p = write(env, """
jobs:
  a:
    steps:
      - {run: "exit 1", continue_on_error: true}
      - {name: after, run: "echo after"}
""")
    code, record = run(env, p)
    assert code == 0
    assert [s["state"] for s in record["jobs"][0]["steps"]] == ["failure", "success"]


def test_step_timeout_kills_the_whole_process_group(env: Env) -> None:
    pidfile = env.root / "child.pid"
    p = write(env, f"""
jobs:
  slow:
    steps:
      - name: hang
        timeout: 1s
        run: "sleep 300 & echo $! > {pidfile}; wait"
      - {{name: teardown, if: always(), run: "echo done"}}
""")
    code, record = run(env, p)
    assert code == 1
    job = record["jobs"][0]
    assert job["state"] == "timed_out" and "timed out" in job["reason"]
    assert job["steps"][1]["state"] == "success"
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


def test_job_timeout(env: Env) -> None:
    p = write(env, """
jobs:
  slow:
    timeout: 1s
    steps: [{run: "true"}, {run: "sleep 300"}, {run: "echo never"}]
""")
    code, record = run(env, p)
    assert code == 1 and record["jobs"][0]["state"] == "timed_out"
    assert [s["state"] for s in record["jobs"][0]["steps"]] == ["success", "timed_out", "skipped"]


def test_secrets_are_masked_everywhere(env: Env) -> None:
    env.environ["DEPLOY_TOKEN"] = "s3cr3t-value-42"
    p = write(env, """
secrets: [DEPLOY_TOKEN]
jobs:
  a:
    outputs: [leak]
    steps:
      - run: 'echo "token=$DEPLOY_TOKEN"; echo "leak=$DEPLOY_TOKEN" >> $STICKYCI_OUTPUT; exit 1'
""")
    code, record = run(env, p)
    assert code == 1
    everything = log_text(record) + json.dumps(record)
    everything += (Path(record["run_dir"]) / "summary.md").read_text()
    assert "s3cr3t-value-42" not in everything
    assert "token=***" in log_text(record)


def test_disks_hand_off_between_jobs_and_cold_commits_nothing(env: Env) -> None:
    p = write(env, """
vars: {repo: r}
jobs:
  warm:
    disks: [{key: "${{ vars.repo }}-deps", path: deps}]
    steps: [{run: "test -e deps/lib || echo built > deps/lib; cat deps/lib"}]
  build:
    needs: [warm]
    matrix: {axes: {svc: [x, y]}}
    disks:
      - {key: "${{ vars.repo }}-deps", path: deps, commit: never}
      - {key: "${{ vars.repo }}-out-${{ matrix.svc }}-${{ sha }}", path: out}
    steps: [{run: "cp deps/lib out/${{ matrix.svc }}.bin"}]
  deploy:
    needs: [build]
    matrix: {axes: {svc: [x, y]}}
    disks: [{key: "${{ vars.repo }}-out-${{ matrix.svc }}-${{ sha }}", path: a, commit: never}]
    steps: [{run: "grep built a/${{ matrix.svc }}.bin"}]
""")
    code, record = run(env, p, "--sha", "c0ffee")
    assert code == 0, record
    warm = jobs(record)["warm"]["disks"][0]
    assert warm["committed"] and warm["fresh"]
    keys = {d["key"] for d in env.json("disk", "ls")}
    assert keys == {"r-deps", "r-out-x-c0ffee", "r-out-y-c0ffee"}

    code, again = run(env, p, "--sha", "c0ffee")
    assert code == 0
    assert not jobs(again)["warm"]["disks"][0]["fresh"]
    assert jobs(again)["warm"]["disks"][0]["commit_reason"].startswith("nothing changed")

    gens = {d["key"]: d["generation"] for d in env.json("disk", "ls")}
    code, cold = run(env, p, "--sha", "c0ffee", "--cold")
    assert code == 0, cold  # handoffs still work within a cold run
    assert jobs(cold)["warm"]["disks"][0]["fresh"]  # but every disk started empty
    assert jobs(cold)["warm"]["disks"][0]["committed"]
    assert {d["key"]: d["generation"] for d in env.json("disk", "ls")} == gens


def test_outputs_flow_to_dependents(env: Env) -> None:
    p = write(env, """
jobs:
  a:
    outputs: [version]
    steps: [{run: "echo version=1.2.3 >> $STICKYCI_OUTPUT"}]
  b:
    needs: [a]
    steps: [{run: "test '${{ needs.a.outputs.version }}' = 1.2.3"}]
""")
    code, record = run(env, p)
    assert code == 0 and jobs(record)["a"]["outputs"] == {"version": "1.2.3"}


def test_bad_pipeline_fails_before_running_anything(env: Env) -> None:
    marker = env.root / "ran"
    p = write(env, f"""
jobs:
  a: {{steps: [{{run: "touch {marker}"}}]}}
  b: {{needs: [nope], steps: [{{run: "true"}}]}}
""")
    proc = env.run("run", str(p), check=False)
    assert proc.returncode == 2
    assert "unknown job 'nope'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_sigint_cancels_runs_teardown_and_discards_disks(env: Env) -> None:
    started, torn = env.root / "started", env.root / "torn"
    p = write(env, f"""
jobs:
  long:
    disks: [{{key: cancelled-disk, path: d}}]
    steps:
      - {{name: work, run: "echo data > d/f; touch {started}; sleep 300"}}
      - {{name: teardown, if: always(), run: "touch {torn}"}}
  after: {{needs: [long], steps: [{{run: "true"}}]}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(p), "--json"],
                            env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    def long_started() -> bool:
        assert proc.poll() is None
        return started.exists()

    wait_for(long_started, "the long step to start", timeout=60, interval=0.02)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    record = json.loads(out)
    j = jobs(record)
    assert record["state"] == "cancelled"
    assert j["long"]["state"] == "cancelled"
    assert [s["state"] for s in j["long"]["steps"]] == ["cancelled", "success"]
    assert torn.exists()
    assert j["after"]["state"] == "cancelled"
    assert env.json("disk", "ls") == []  # the disk was discarded, not committed


def test_live_table_on_a_terminal(env: Env) -> None:
    p = write(env, """
name: live
jobs:
  first: {steps: [{name: say hello, run: "echo hi"}]}
  second: {needs: [first], steps: [{run: "exit 4"}]}
""")
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(p)], env=env.environ,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    out, _ = proc.communicate(timeout=120)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    text = screen.decode(errors="replace")
    assert proc.returncode == 1
    assert "live · run" in text and "\x1b[" in text  # a table drawn with terminal codes
    assert "first" in text and "second" in text and "failure" in text
    assert "FAILED second: step 'exit 4' exited 4" in out


def test_bench_compares_cold_and_warm(env: Env) -> None:
    # The "dependency build" runs only when the disk is empty, as a real one would.
    p = write(env, """
name: tiny
jobs:
  deps:
    disks: [{key: tiny-deps, path: d}]
    steps: [{run: "test -e d/built || { for i in $(seq 300); do echo $i > /dev/null; done;
             python3 -c 'import time; time.sleep(3)'; touch d/built; }"}]
  use: {needs: [deps], steps: [{run: "true"}]}
""")
    chart = env.root / "chart.png"
    proc = env.run("bench", str(p), "--runs", "1", "--chart", str(chart), "--json")
    doc = json.loads(proc.stdout)
    rows = {r["job"]: r for r in doc["rows"]}
    assert set(rows) == {"deps", "use", "total"}
    # The build takes 3 s when it runs: far more than a warm job's overhead, even on a loaded
    # machine (a warm job took up to 1 s at a load average of 10 on 2 cores).
    assert rows["deps"]["cold"] > 3 > rows["deps"]["warm"]
    assert rows["total"]["ratio"] < 1
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Never silent for minutes: it says what it will do, where the chart goes, and each run.
    said = [line for line in proc.stderr.splitlines() if line.startswith("bench: ")]
    ended = [line for line in said if re.match(r"bench: run \d{8}-", line)]
    assert [line for line in said if line not in ended] == [
        "bench: 3 runs: a warm-up (not counted: it commits the disks the first warm run "
        f"mounts), then 1 cold and 1 warm, alternating; chart: {chart}",
        "bench: warm-up run", "bench: run 1/1, cold", "bench: run 1/1, warm"]
    # How each run's disks started: the warm-up on an empty store is no warm run.
    assert [re.sub(r".*success in [\d.]+s ", "", line) for line in ended] == [
        "(empty)", "(cold)", "(warm)"]
    assert doc["chart"] == str(chart)


def test_cold_help_says_what_cold_does(env: Env) -> None:
    # Before: "commit nothing", while docs/pipelines.md says commits go to private copies.
    text = " ".join(env.run("run", "--help").stdout.split())
    assert "every disk starts empty, and commits go to copies private to the run" in text
    assert "commit nothing" not in text


def test_store_option_sends_disks_to_that_store(env: Env) -> None:
    other = env.root / "other-store"
    p = write(env, "jobs:\n  a:\n    disks: [{key: elsewhere, path: d}]\n"
                   "    steps: [{run: 'echo x > d/f'}]\n")
    code, _ = run(env, p, "--store", f"file://{other}")
    assert code == 0
    assert env.json("disk", "ls") == []
    assert [d["key"] for d in env.json("disk", "ls", "--store", f"file://{other}")] == ["elsewhere"]


def test_trust_owners_is_passed_to_the_mount(env: Env) -> None:
    p = write(env, """
jobs:
  make:
    disks: [{key: owned, path: d}]
    steps: [{run: "echo x > d/f; chown 12345:12345 d/f; chmod 2755 d/f"}]
  trusted:
    needs: [make]
    disks: [{key: owned, path: d, commit: never, trust_owners: true}]
    steps: [{run: 'test "$(stat -c %u:%a d/f)" = 12345:2755'}]
  untrusted:
    needs: [trusted]
    disks: [{key: owned, path: d, commit: never}]
    steps: [{run: 'test "$(stat -c %u:%a d/f)" = "$(id -u):755"'}]
""")
    code, record = run(env, p)
    assert code == 0, [(j["id"], j["reason"]) for j in record["jobs"]]
