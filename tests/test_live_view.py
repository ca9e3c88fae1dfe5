"""What a run shows while it runs (issue 16): the live table in a real terminal (a pty of a
fixed size), lines streamed as steps write them when piped, and ``stickyci logs -f``.

Each pipeline waits on gate files the test creates, so every state is seen for sure, without
sleeping: the test waits for what the screen shows, then opens the next gate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Env, wait_for

ROWS, COLS = 50, 140
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
WAIT = 120.0  # generous: the machine is shared, and a run starts a few Python processes


def gate(name: str) -> str:
    return f"until [ -e {name} ]; do sleep 0.02; done"


def pipeline(env: Env) -> Path:
    """A matrix whose labels look like markup, a job waiting for it, and one that fails."""
    g = env.root
    p = env.root / "live.yml"
    p.write_text(f"""
name: live
jobs:
  warm:
    steps:
      - {{name: prepare, run: "echo preparing; {gate(g / 'go-warm')}"}}
  build:
    needs: [warm]
    matrix: {{axes: {{svc: [redis-server, "[bold]x", "\\e[31mred"]}}}}
    steps:
      - name: "compile ${{{{ matrix.svc }}}}"
        run: "echo compiling; {gate(g / 'go-build')}"
  deploy:
    needs: [build]
    steps:
      - {{name: push, run: "echo pushing; exit 3"}}
""")
    return p


def finish(env: Env, *procs: subprocess.Popen[Any] | None) -> None:
    """Open the gates (a killed runner leaves its steps' shells waiting on them), then stop
    whatever of ``procs`` still runs."""
    (env.root / "go-warm").touch()
    (env.root / "go-build").touch()
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


class Reader:
    """Everything a file descriptor yields, gathered by a thread as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data, self.lock = fd, b"", threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the terminal's last writer closed it
                return
            if not chunk:
                return
            with self.lock:
                self.data += chunk

    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")


def frames(screen: str) -> list[list[list[str]]]:
    """The tables drawn so far, each a list of rows of cells (escape sequences removed)."""
    out = []
    for chunk in _ESCAPES.sub("", screen).split("┏")[1:]:
        rows = [[c.strip() for c in line.strip().strip("│").split("│")]
                for line in chunk.splitlines() if line.strip().startswith("│")]
        out.append(rows)
    return out


def seen(screen: str, *rows: tuple[str, ...]) -> bool:
    """Whether one table showed every row of ``rows`` (each given by its first cells, a cell
    ending in ``…`` matched as a prefix, ``~`` as a number of seconds)."""
    def match(row: list[str], want: tuple[str, ...]) -> bool:
        if len(row) < len(want):
            return False
        for cell, w in zip(row, want, strict=False):
            if w == "~":
                if not re.fullmatch(r"\d+\.\ds", cell):
                    return False
            elif w.endswith("…"):
                if not cell.startswith(w[:-1]):
                    return False
            elif cell != w:
                return False
        return True
    return any(all(any(match(r, w) for r in frame) for w in rows) for frame in frames(screen))


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pty of ROWS x COLS: (master, slave)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    try:
        yield master, slave
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):  # the test closed the slave already
                os.close(fd)


def test_live_table_rows_states_and_labels(env: Env, terminal: tuple[int, int]) -> None:
    master, slave = terminal
    p = pipeline(env)
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(p)], env=env.environ,
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    screen = Reader(master)
    try:
        def showing(*rows: tuple[str, ...]) -> bool:
            assert proc.poll() is None, screen.text()[-3000:]
            return seen(screen.text(), *rows)

        # The first job runs its step (with the step's own time); the others wait, "pending".
        wait_for(lambda: showing(("warm", "running", "~", "prepare …"),
                                 ("build [redis-server]", "pending", ""),
                                 ("deploy", "pending", "")),
                 "warm running, the rest pending", timeout=WAIT)
        (env.root / "go-warm").touch()
        # Matrix instances by their labels, shown as written: brackets are not markup, and an
        # escape sequence in a value is shown escaped, not sent to the terminal.
        wait_for(lambda: showing(("warm", "success", "~"),
                                 ("build [redis-server]", "running", "~",
                                  "compile redis-server …"),
                                 ("build [[bold]x]", "running", "~", "compile [bold]x …"),
                                 ("build [\\x1b[31mred]", "running", "~", "compile \\x1b…"),
                                 ("deploy", "pending", "")),
                 "the matrix running", timeout=WAIT)
        (env.root / "go-build").touch()
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        finish(env, proc)
    screen.thread.join(timeout=10)
    text = screen.text()
    assert proc.returncode == 1
    assert seen(text, ("build [redis-server]", "success", "~"),
                ("deploy", "failure", "~", "step 'push' exited 3"))
    assert "\x1b[31mred" not in text  # the raw sequence never reached the terminal
    # "success 0.0s" next to a running step, "[]pending": never.
    assert not any(r[1] == "success" and r[3].startswith(("prepare", "compile"))
                   for f in frames(text) for r in f if len(r) > 3)
    assert "[]" not in _ESCAPES.sub("", text)
    assert "FAILED deploy: step 'push' exited 3" in out


def test_piped_output_streams_step_lines_as_they_are_written(env: Env) -> None:
    p = pipeline(env)
    proc = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(p)], env=env.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = Reader(proc.stderr.fileno())
    try:
        # Printed while the step still waits for its gate: streamed, not at the job's end.
        wait_for(lambda: "warm | preparing" in err.text(), "the first step's line",
                 timeout=WAIT)
        assert not (env.root / "go-warm").exists() and proc.poll() is None
        (env.root / "go-warm").touch()
        wait_for(lambda: "build [redis-server] | compiling" in err.text(),
                 "a matrix instance's line", timeout=WAIT)
        (env.root / "go-build").touch()
        proc.wait(timeout=WAIT)
    finally:
        finish(env, proc)
    err.thread.join(timeout=10)
    text = err.text()
    assert proc.returncode == 1
    lines = text.splitlines()
    assert "build [[bold]x] | compiling" in lines
    assert "deploy | pushing" in lines
    assert any(re.fullmatch(r"\[ *\d+\.\ds\] warm +step prepare", line) for line in lines)
    assert any(re.fullmatch(r"\[ *\d+\.\ds\] deploy +step push: failure, exit 3 \(.*\)", line)
               for line in lines), text
    assert "\x1b" not in text


def test_quiet_prints_only_job_starts_and_ends(env: Env) -> None:
    (env.root / "go-warm").touch()
    (env.root / "go-build").touch()
    proc = env.run("run", str(pipeline(env)), "--quiet", check=False)
    assert proc.returncode == 1
    events = proc.stderr.splitlines()
    assert events and all(re.match(r"\[ *\d+\.\ds\] ", e) for e in events), events
    assert not any(" | " in e or re.match(r"\[ *\d+\.\ds\] .{40} step ", e) for e in events)
    assert sum(1 for e in events if e.endswith(" running")) == 5  # warm, 3 builds, deploy


def test_logs_follow_a_live_run_from_another_terminal(env: Env) -> None:
    p = pipeline(env)
    runner = subprocess.Popen([sys.executable, "-m", "stickyci", "run", str(p), "--quiet"],
                              env=env.environ, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    follower: subprocess.Popen[bytes] | None = None
    try:
        def recorded() -> bool:
            assert runner.poll() is None
            return bool(json.loads(env.run("runs", "ls", "--json").stdout))

        wait_for(recorded, "the run in the history", timeout=WAIT)
        run_id = json.loads(env.run("runs", "ls", "--json").stdout)[0]["id"]
        follower = subprocess.Popen(
            [sys.executable, "-m", "stickyci", "logs", run_id[:15], "-f"], env=env.environ,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert follower.stdout is not None
        out = Reader(follower.stdout.fileno())
        wait_for(lambda: "warm | preparing" in out.text().splitlines(),
                 "the follower to print the running step", timeout=WAIT)
        assert follower.poll() is None  # still following: the run is not over
        (env.root / "go-warm").touch()
        (env.root / "go-build").touch()
        follower.wait(timeout=WAIT)
        out.thread.join(timeout=10)
        lines = out.text().splitlines()
        # It ends with the run, exiting as `stickyci run` did (a job failed: 1).
        assert follower.returncode == 1 and runner.wait(timeout=WAIT) == 1
        assert "build [redis-server] | compiling" in lines and "deploy | pushing" in lines
        assert "deploy | ==> deploy/01-push.log <==" in lines
    finally:
        finish(env, runner, follower)
    # One job, one instance or all of a matrix job; unprefixed for one.
    assert env.run("logs", "latest", "deploy").stdout == "==> deploy/01-push.log <==\npushing\n"
    assert env.run("logs", "latest", "build [redis-server]").stdout.splitlines()[1] == "compiling"
    both = env.run("logs", "latest", "build").stdout.splitlines()
    assert "build [[bold]x] | compiling" in both and "build [redis-server] | compiling" in both
    missing = env.run("logs", "latest", "nope", check=False)
    assert missing.returncode != 0 and "no job 'nope'" in missing.stderr
