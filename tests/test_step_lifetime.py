"""A step ends when its shell exits; what it left running is named, and stopped (issue 16).

Every daemon here calls ``setsid`` and keeps the step's output open without redirecting it, as
the issue's deploy step did: before, the runner waited on the pipe it held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import Env

from stickyci.pipeline import leftovers

# A daemon that leaves the step's process group, keeps its output, and says where it is.
DAEMON = ("mkdir -p srv; (cd srv && exec setsid bash -c "
          "'echo $$ > ../daemon.pid; while :; do echo tick; sleep 0.1; done') &")


def run(env: Env, text: str) -> tuple[int, dict[str, Any]]:
    p = env.root / "p.yml"
    p.write_text(text)
    proc = env.run("run", str(p), "--json", check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def step_log(record: dict[str, Any], job: int, step: int) -> str:
    return (Path(record["run_dir"]) / record["jobs"][job]["steps"][step]["log"]).read_text()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_step_ends_when_its_shell_exits_and_its_leftover_is_named_and_stopped(
        env: Env) -> None:
    code, record = run(env, f"""
jobs:
  deploy:
    timeout: 2m
    steps:
      - name: start
        run: |
          {DAEMON}
          until [ -s daemon.pid ]; do sleep 0.01; done
          cp daemon.pid "$STICKYCI_WORKSPACE/../daemon.pid.copy"
          seq 1 20000
          echo last line
      - name: next
        # Gone, or a zombie waiting for PID 1 to reap it (kill -0 would find that one).
        run: |
          s=$(cut -d' ' -f3 /proc/$(cat daemon.pid)/stat 2>/dev/null || true)
          case "$s" in ""|Z|X) echo alone;; *) echo "still $s"; exit 1;; esac
""")
    assert code == 0, record["jobs"][0]["reason"]
    start, nxt = record["jobs"][0]["steps"]
    # Ended with its shell, long before the job's timeout, and long before the 5 s the runner
    # used to wait on a pipe a setsid daemon held.
    assert start["state"] == "success" and start["seconds"] < 3, start
    assert record["seconds"] < 30
    log = step_log(record, 0, 0)
    lines = log.splitlines()
    # Everything the step wrote before it exited was read: 20000 numbers, then its last line.
    assert lines[lines.index("1"):lines.index("20000") + 1] == [str(i) for i in range(1, 20001)]
    assert "last line" in lines
    pid = int((Path(record["run_dir"]) / "ws" / "daemon.pid.copy").read_text())
    named = [line for line in lines if line.startswith("stickyci: the step left")]
    assert len(named) == 1, log
    assert "stopping them" in named[0] and f"{pid} (bash -c" in named[0]
    assert not alive(pid)
    # The daemon was stopped before the next step: it saw no such process.
    assert nxt["state"] == "success" and step_log(record, 0, 1) == "alone\n"


def test_background_keep_runs_on_for_later_steps_and_stops_before_the_commit(env: Env) -> None:
    code, record = run(env, f"""
jobs:
  deploy:
    timeout: 2m
    disks: [{{key: served, path: d}}]
    steps:
      - name: start
        background: keep
        run: |
          cd d; {DAEMON}
          until [ -s daemon.pid ]; do sleep 0.01; done
          cp daemon.pid "$STICKYCI_WORKSPACE/../daemon.pid.copy"
      - name: use
        run: 'kill -0 "$(cat d/daemon.pid)" && echo daemon-alive'
      - name: teardown
        if: always()
        run: echo teardown
""")
    assert code == 0, record["jobs"][0]["reason"]
    job = record["jobs"][0]
    assert [s["state"] for s in job["steps"]] == ["success"] * 3
    assert step_log(record, 0, 1) == "daemon-alive\n"
    pid = int((Path(record["run_dir"]) / "ws" / "daemon.pid.copy").read_text())
    assert not alive(pid)
    log = step_log(record, 0, 0)
    kept = log.index("kept until the job's steps are done (background: keep)")
    stopped = log.index("the job's steps are done; stopped")
    assert kept < log.index("tick", kept) < stopped  # its output still went to the log
    assert f"{pid} (bash -c" in log[stopped:]
    # Stopped before the commit: the disk (the daemon's working directory) was not busy.
    disk = job["disks"][0]
    assert disk["committed"] and not disk["error"], disk


def test_a_process_that_clears_its_environment_but_holds_the_output_is_found(env: Env) -> None:
    code, record = run(env, """
jobs:
  a:
    timeout: 2m
    steps:
      - run: |
          (exec env -i setsid sleep 3601.25) &
          # Once it is sleep, it has its own session and no environment: only the pipe is left.
          until [ "$(tr '\\0' ' ' < /proc/$!/cmdline)" = "sleep 3601.25 " ]; do sleep 0.01; done
          echo started
""")
    assert code == 0
    step = record["jobs"][0]["steps"][0]
    assert step["seconds"] < 3
    assert "running; stopping them" in step_log(record, 0, 0)
    assert "(sleep 3601.25)" in step_log(record, 0, 0)
    assert not any(_cmdline(p) == b"sleep\x003601.25\x00" for p in _pids())


def test_background_must_be_stop_or_keep(env: Env) -> None:
    p = env.root / "p.yml"
    p.write_text("jobs:\n  a:\n    steps: [{run: 'true', background: forever}]\n")
    proc = subprocess.run([sys.executable, "-m", "stickyci", "run", str(p)], env=env.environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "background" in proc.stderr, proc.stderr


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_leftovers_command_line_is_masked_in_the_log(env: Env) -> None:
    secret = "s3cr3t-deploy-token-1234"
    env.environ["DEPLOY_TOKEN"] = secret
    code, record = run(env, """
secrets: [DEPLOY_TOKEN]
jobs:
  a:
    steps:
      - run: |
          (exec setsid bash -c 'sleep 3600; :' "$DEPLOY_TOKEN") &
          until tr '\\0' ' ' < /proc/$!/cmdline | grep -q '^bash -c'; do sleep 0.01; done
""")
    assert code == 0
    log = step_log(record, 0, 0)
    assert "stopping them" in log and "bash -c sleep 3600; : ***" in log, log
    assert secret not in log


def test_holding_only_the_read_end_of_a_steps_output_does_not_make_a_leftover() -> None:
    # Every process the runner forks holds the read end until it execs: another job's step
    # being started right then was stopped as this step's leftover (the example's builds
    # failed with "exited -15" one run in four).
    rfd, wfd = os.pipe()
    pipes = frozenset({os.fstat(rfd).st_ino})
    reader = subprocess.Popen(["sleep", "60"], pass_fds=(rfd,))
    writer = subprocess.Popen(["sleep", "60"], pass_fds=(wfd,))
    os.close(rfd)
    os.close(wfd)
    try:
        found = leftovers.find(leftovers.Traces("no-such-step.", pipes=pipes))
        assert [p.pid for p in found] == [writer.pid]
    finally:
        for proc in (reader, writer):
            proc.kill()
            proc.wait()
