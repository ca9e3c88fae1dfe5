"""A job's disk operations run in children of one disk helper per process: each in a session of
its own that the guard knows before it starts, with the caller's environment, answering what
``stickyci disk --json`` answers; and the helper dies with the process that started it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import Env, elsewhere, wait_for

from stickyci.pipeline import diskclient
from stickyci.pipeline.diskclient import DiskClient, DiskFailure
from stickyci.pipeline.masking import Masker


class Recorder:
    """A guard that records the process groups it is told about, and what they were."""

    def __init__(self, kill: bool = False) -> None:
        self.added: list[int] = []
        self.discarded: list[int] = []
        self.sessions: list[int] = []
        self.kill = kill

    def add(self, pgid: int) -> None:
        self.added.append(pgid)
        self.sessions.append(os.getsid(pgid))
        if self.kill:
            os.killpg(pgid, signal.SIGKILL)

    def discard(self, pgid: int) -> None:
        self.discarded.append(pgid)


def test_each_operation_runs_guarded_in_a_session_of_its_own(env: Env) -> None:
    guard = Recorder()
    client = DiskClient(env.environ, guard, Masker({}))
    ws = env.root / "ws"

    async def job() -> None:
        mounted = await client.mount("k", ws, "copy", False)
        assert not isinstance(mounted, DiskFailure) and mounted["fresh"]
        (ws / "f").write_text("x")
        committed = await client.commit(ws, "on-change")
        assert not isinstance(committed, DiskFailure) and committed["generation"] == 1

    asyncio.run(job())
    assert len(set(guard.added)) == 2 and guard.discarded == guard.added
    assert guard.sessions == guard.added  # each leads a session: the guard can end all of it
    assert os.getpid() not in guard.added
    helper = diskclient._helper
    assert helper is not None and helper.proc.pid not in guard.added
    # The same document as the CLI's, key for key.
    cli = env.json("disk", "mount", "k", str(env.root / "ws2"), "--strategy", "copy")
    again = asyncio.run(client.mount("k", env.root / "ws3", "copy", False))
    assert not isinstance(again, DiskFailure)
    assert again.keys() == cli.keys() and again["generation"] == cli["generation"] == 1
    assert diskclient._helper is helper  # started once for the process


def test_each_operation_sees_its_own_clients_environment(env: Env) -> None:
    other = elsewhere(env, "other-cache")
    other.environ["STICKYCI_STORE"] = f"file://{env.root / 'other-store'}"
    mine = DiskClient(env.environ, None, Masker({}))
    theirs = DiskClient(other.environ, None, Masker({}))
    ws = env.root / "ws"
    asyncio.run(mine.mount("k", ws, "copy", False))
    (ws / "f").write_text("x")
    asyncio.run(mine.commit(ws, "on-change"))
    got = asyncio.run(theirs.mount("k", env.root / "there", "copy", False))
    assert not isinstance(got, DiskFailure) and got["fresh"]  # not in the other store
    assert (env.root / "other-store").is_dir()
    assert (env.root / "other-cache" / "bases" / "empty").is_dir()


def test_an_operation_killed_before_it_answers_is_a_failure(env: Env) -> None:
    client = DiskClient(env.environ, Recorder(kill=True), Masker({}))
    got = asyncio.run(client.mount("k", env.root / "ws", "copy", False))
    assert isinstance(got, DiskFailure) and got.kind == ""
    assert "died before it answered" in got.message
    assert not (env.root / "ws").exists()  # killed before it started: it never ran


def test_the_helper_ends_with_the_process_that_started_it(env: Env, tmp_path: Path) -> None:
    script = ("import asyncio, os, sys\n"
              "from stickyci.pipeline import diskclient\n"
              "from stickyci.pipeline.masking import Masker\n"
              "c = diskclient.DiskClient(None, None, Masker({}))\n"
              f"asyncio.run(c.mount('k', __import__('pathlib').Path({str(tmp_path / 'ws')!r}),"
              " 'copy', False))\n"
              "print(diskclient._helper.proc.pid, flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env.environ,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    helper = int(proc.stdout.strip())

    def gone() -> bool:
        try:
            state = Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"  # exited, not yet reaped

    wait_for(gone, "the disk helper to exit")


def test_a_prestarted_helper_is_the_one_the_first_operation_uses(env: Env) -> None:
    code = ("import asyncio, pathlib, sys\n"
            "from stickyci.pipeline import diskclient\n"
            "from stickyci.pipeline.masking import Masker\n"
            "diskclient.prestart()\n"
            "first = diskclient._helper.proc.pid\n"
            "c = diskclient.DiskClient(None, None, Masker({}))\n"
            f"got = asyncio.run(c.mount('k', pathlib.Path({str(env.root / 'ws')!r}), 'copy',"
            " False))\n"
            "assert got['fresh'], got\n"
            "print(first == diskclient._helper.proc.pid)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env.environ, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_stickyci_run_starts_its_helper_before_it_loads_the_runner(env: Env) -> None:
    # The runner's imports take longer than the helper's start: begun first, the helper is
    # ready by the first mount. Whether it was already started is recorded at the moment the
    # runner's module begins to load; a disk command starts none.
    code = ("import sys\n"
            "from stickyci.cli.main import cli\n"
            "from stickyci.pipeline import diskclient\n"
            "seen = {}\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'stickyci.cli.run':\n"
            "            seen['started'] = diskclient._helper is not None\n"
            "sys.meta_path.insert(0, Spy())\n"
            "cli.get_command(None, 'disk')\n"
            "print(diskclient._helper is None)\n"
            "cli.get_command(None, 'run')\n"
            "print(seen['started'], diskclient._helper.usable())\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env.environ, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]
