"""The sticky-disk GitHub Action (actions/sticky-disk), run the way the runner runs it.

Each step is ``node main.js`` or ``node post.js`` in the job's workspace, with every input as
``INPUT_<NAME>`` (the defaults of action.yml filled in, ``job-status`` evaluated as the
runner would at that point), fresh ``GITHUB_OUTPUT``/``GITHUB_STATE`` files per step, and in
post the main step's state as ``STATE_<name>``. Against a real ``file://`` store and a real
``stickyci serve``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import STRATEGIES, Env, is_mount_record, wait_for
from server import Server

ACTION = Path(__file__).resolve().parent.parent / "actions" / "sticky-disk"
META = yaml.safe_load((ACTION / "action.yml").read_text())
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="needs node (Debian nodejs)")


def parse_file_commands(text: str) -> dict[str, str]:
    """``name=value`` and ``name<<DELIM``…``DELIM`` entries, as the runner reads them."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            value = []
            for more in lines:
                if more == delim:
                    break
                value.append(more)
            else:
                raise AssertionError(f"unterminated {name!r} (delimiter {delim!r})")
            out[name] = "\n".join(value)
        elif line:
            name, _, value = line.partition("=")
            out[name] = value
    return out


@dataclass
class Step:
    """What one entry point did."""

    code: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    state: dict[str, str]
    path_added: list[str]

    @property
    def warnings(self) -> list[str]:
        return re.findall(r"^::warning::(.*)$", self.stdout, re.M)

    @property
    def errors(self) -> list[str]:
        return re.findall(r"^::error::(.*)$", self.stdout, re.M)


@dataclass
class Job:
    """One job on a pretend runner: a workspace, the environment the runner gives steps."""

    root: Path
    environ: dict[str, str]
    inputs: dict[str, str]
    state: dict[str, str] = field(default_factory=dict)
    steps: int = 0

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    def _run(self, entry: str, job_status: str) -> Step:
        self.steps += 1
        files = self.root / "runner" / f"step{self.steps}"
        files.mkdir(parents=True)
        names = {"GITHUB_OUTPUT": "output", "GITHUB_STATE": "state", "GITHUB_PATH": "path",
                 "GITHUB_STEP_SUMMARY": "summary"}
        environ = {**self.environ, **{var: str(files / n) for var, n in names.items()}}
        for name, spec in META["inputs"].items():
            value = self.inputs.get(name, str(spec.get("default", "")))
            environ[f"INPUT_{name.upper()}"] = value.replace("${{ job.status }}", job_status)
        environ.update({f"STATE_{k}": v for k, v in self.state.items()})
        proc = subprocess.run([NODE or "node", str(ACTION / META["runs"][entry])],
                              cwd=self.workspace, env=environ, capture_output=True, text=True,
                              timeout=300)

        def read(n: str) -> str:
            p = files / n
            return p.read_text() if p.exists() else ""

        return Step(proc.returncode, proc.stdout, proc.stderr,
                    parse_file_commands(read("output")), parse_file_commands(read("state")),
                    read("path").splitlines())

    def main(self) -> Step:
        """The main step; its state is kept for post, as the runner keeps it."""
        step = self._run("main", "success")
        self.state = step.state
        return step

    def post(self, job_status: str = "success") -> Step:
        """The post step, when the job's status is ``job_status``."""
        return self._run("post", job_status)


@pytest.fixture
def runner(env: Env) -> Iterator[Env]:
    """``env`` with stickyci on PATH, as on a runner that has it installed."""
    bindir = str(Path(sys.executable).parent)
    assert (Path(bindir) / "stickyci").exists(), "stickyci is not installed in the venv"
    env.environ["PATH"] = f"{bindir}{os.pathsep}{env.environ.get('PATH', '')}"
    yield env


def job(env: Env, name: str, **inputs: str) -> Job:
    """A new job of the workflow, on the machine ``env`` describes."""
    root = env.root / name
    (root / "workspace").mkdir(parents=True)
    environ = {**env.environ, "GITHUB_WORKSPACE": str(root / "workspace"),
               "RUNNER_TEMP": str(root / "temp"), "RUNNER_TOOL_CACHE": str(root / "tools")}
    return Job(root, environ, {"strategy": "copy", **inputs})


def generations(env: Env, key: str) -> list[int]:
    """The generations the store holds for ``key`` (none if the disk does not exist)."""
    proc = env.run("disk", "show", key, "--json", check=False)
    if proc.returncode != 0:
        assert f"disk {key} does not exist" in proc.stderr, proc.stderr
        return []
    return [g["gen"] for g in json.loads(proc.stdout)["generations"]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_true_hands_the_tree_to_the_next_job(runner: Env, strategy: str) -> None:
    first = job(runner, "j1", key="deps", path="cache", strategy=strategy)
    m = first.main()
    assert m.code == 0 and not m.warnings, m.stdout + m.stderr
    assert m.outputs["mounted"] == "true" and m.outputs["exists"] == "false"
    assert m.outputs["generation"] == "0"
    assert Path(m.outputs["stickyci"]).name == "stickyci"
    (first.workspace / "cache" / "lib.o").write_text("compiled")
    p = first.post()
    assert p.code == 0, p.stdout + p.stderr
    assert p.outputs == {"committed": "true", "committed-generation": "1"}
    assert "committed deps generation 1" in p.stdout
    assert "committed generation 1" in (first.root / "runner" / "step2" / "summary").read_text()
    assert not is_mount_record(runner, first.workspace / "cache")

    second = job(runner, "j2", key="deps", path="cache", strategy=strategy)
    m = second.main()
    assert m.outputs["strategy"] == strategy
    assert m.outputs["exists"] == "true" and m.outputs["generation"] == "1"
    assert len(m.outputs["snapshot"]) == 64
    assert (second.workspace / "cache" / "lib.o").read_text() == "compiled"
    # `true` stores a generation even when nothing changed.
    assert second.post().outputs["committed-generation"] == "2"
    assert generations(runner, "deps") == [1, 2]


def test_on_change_commits_only_a_changed_tree(runner: Env) -> None:
    seed = job(runner, "seed", key="k", path="d")
    seed.main()
    (seed.workspace / "d" / "f").write_text("1")
    seed.post()
    same = job(runner, "same", key="k", path="d", commit="on-change")
    same.main()
    p = same.post()
    assert p.outputs["committed"] == "false" and "nothing changed" in p.stdout
    changed = job(runner, "changed", key="k", path="d", commit="on-change")
    changed.main()
    (changed.workspace / "d" / "f").write_text("2")
    assert changed.post().outputs["committed-generation"] == "2"
    assert generations(runner, "k") == [1, 2]


def test_if_missing_commits_only_a_new_disk(runner: Env) -> None:
    new = job(runner, "new", key="once", path="d", commit="if-missing")
    new.main()
    (new.workspace / "d" / "f").write_text("first")
    assert new.post().outputs["committed-generation"] == "1"
    again = job(runner, "again", key="once", path="d", commit="if-missing")
    assert again.main().outputs["exists"] == "true"
    (again.workspace / "d" / "f").write_text("second")
    p = again.post()
    assert p.outputs["committed"] == "false" and "already has a snapshot" in p.stdout
    check = job(runner, "check", key="once", path="d", commit="false")
    check.main()
    assert (check.workspace / "d" / "f").read_text() == "first"


def test_commit_false_discards_the_changes(runner: Env) -> None:
    j = job(runner, "j", key="scratch", path="d", commit="false")
    j.main()
    (j.workspace / "d" / "f").write_text("x")
    p = j.post()
    assert p.code == 0 and p.outputs["committed"] == "false"
    assert "commit: false" in p.stdout
    assert generations(runner, "scratch") == []
    assert not is_mount_record(runner, j.workspace / "d")


@pytest.mark.parametrize("status", ["failure", "cancelled"])
def test_a_failed_job_commits_nothing(runner: Env, status: str) -> None:
    seed = job(runner, "seed", key="k", path="d")
    seed.main()
    (seed.workspace / "d" / "f").write_text("good")
    seed.post()
    bad = job(runner, "bad", key="k", path="d")
    bad.main()
    (bad.workspace / "d" / "f").write_text("half-built")
    p = bad.post(job_status=status)
    assert p.code == 0 and p.outputs["committed"] == "false"
    assert f"the job ended with {status}" in p.stdout
    assert generations(runner, "k") == [1]
    assert not is_mount_record(runner, bad.workspace / "d")


def test_a_mount_failure_runs_the_job_cold(runner: Env) -> None:
    seed = job(runner, "seed", key="k", path="d")
    seed.main()
    (seed.workspace / "d" / "f").write_text("x")
    seed.post()
    # The store answers nonsense for the disk's ref: a real fault, not a simulated one.
    ref = next(p for p in runner.store.rglob("*") if p.is_file() and p.parent.name == "refs")
    ref.write_text("{not json")
    j = job(runner, "j", key="k", path="d")
    m = j.main()
    assert m.code == 0, m.stdout + m.stderr
    assert len(m.warnings) == 1 and "sticky disk k was not mounted" in m.warnings[0]
    assert "runs cold" in m.warnings[0]
    assert m.outputs["mounted"] == "false" and m.outputs["exists"] == "false"
    d = j.workspace / "d"
    assert d.is_dir() and not any(d.iterdir())
    (d / "f").write_text("cold build")
    p = j.post()
    assert p.code == 0 and p.outputs["committed"] == "false"
    assert "was not mounted: nothing to commit" in p.stdout


def test_stickyci_that_cannot_be_installed_degrades(env: Env) -> None:
    env.environ["PATH"] = "/usr/bin:/bin"  # no stickyci here
    j = job(env, "j", key="k", path="d", python="/nonexistent/python3")
    m = j.main()
    assert m.code == 0, m.stdout + m.stderr
    assert "stickyci is not available" in m.warnings[0] and "/nonexistent/python3" in m.warnings[0]
    assert (j.workspace / "d").is_dir()
    assert j.post().code == 0


def test_install_only_without_key(runner: Env) -> None:
    j = job(runner, "j")
    m = j.main()
    assert m.code == 0 and m.outputs == {"stickyci": m.state["stickyci"]}
    p = j.post()
    assert p.code == 0 and p.outputs == {} and p.stdout == ""


@pytest.mark.parametrize(("inputs", "says"), [
    ({"key": "k", "path": "d", "commit": "sometimes"}, "input commit: \"sometimes\" is not one of"),
    ({"key": "k"}, "inputs key and path go together"),
    ({"key": "k", "path": "d", "kill-holders": "yes"}, "input kill-holders: \"yes\" is not true"),
])
def test_bad_inputs_fail_the_step(runner: Env, inputs: dict[str, str], says: str) -> None:
    m = job(runner, "j", **inputs).main()
    assert m.code == 1 and len(m.errors) == 1 and says in m.errors[0], m.stdout


def test_a_stale_mount_from_a_killed_job_is_discarded(runner: Env) -> None:
    seed = job(runner, "seed", key="k", path="d")
    seed.main()
    (seed.workspace / "d" / "f").write_text("committed")
    seed.post()
    killed = job(runner, "killed", key="k", path="d")
    killed.main()
    (killed.workspace / "d" / "f").write_text("never committed")
    # The job dies before its post step; the runner's next job gets the same workspace.
    nxt = Job(killed.root, killed.environ, killed.inputs, steps=killed.steps)
    m = nxt.main()
    assert m.code == 0 and m.outputs["mounted"] == "true", m.stdout
    assert "discarded a mount a previous job left" in m.stdout
    assert (nxt.workspace / "d" / "f").read_text() == "committed"
    assert nxt.post().outputs["committed-generation"] == "2"


def test_a_daemon_holding_the_disk_is_stopped_before_the_commit(runner: Env) -> None:
    j = job(runner, "j", key="k", path="d")
    j.main()
    d = j.workspace / "d"
    (d / "f").write_text("x")
    daemon = subprocess.Popen(["sleep", "600"], cwd=d, start_new_session=True)
    try:
        wait_for(lambda: os.readlink(f"/proc/{daemon.pid}/cwd") == str(d), "the daemon to start")
        p = j.post()
        assert p.code == 0 and p.outputs["committed-generation"] == "1", p.stdout
        assert f"stopped pid {daemon.pid} (sleep" in p.stdout
        assert daemon.wait(30) != 0
    finally:
        daemon.kill()
        daemon.wait()


def test_through_stickyci_serve_with_a_token(env: Env, srv: Server) -> None:
    env.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.environ['PATH']}"
    env.environ.pop("STICKYCI_STORE", None)
    env.environ.pop("STICKYCI_TOKEN", None)
    writer = srv.scoped("--read", "gha-*", "--write", "gha-*")
    reader = srv.scoped("--read", "gha-*")
    first = job(env, "j1", key="gha-deps", path="d", store=srv.url, token=writer)
    m = first.main()
    assert m.code == 0 and m.outputs["mounted"] == "true", m.stdout
    assert f"::add-mask::{writer}" in m.stdout  # the runner masks it in every later log line
    (first.workspace / "d" / "f").write_text("from the server")
    assert first.post().outputs["committed-generation"] == "1"

    # A token that may only read mounts warm, and its commit is refused: a red job.
    ro = job(env, "j2", key="gha-deps", path="d", store=srv.url, token=reader)
    assert ro.main().outputs["generation"] == "1"
    assert (ro.workspace / "d" / "f").read_text() == "from the server"
    (ro.workspace / "d" / "g").write_text("more")
    p = ro.post()
    assert p.code == 1 and "sticky disk gha-deps: commit failed" in p.errors[0], p.stdout
    assert reader not in p.stdout + p.stderr

    # A token the server does not know: the job runs cold.
    bad = job(env, "j3", key="gha-deps", path="d", store=srv.url, token="sci_" + "0" * 40)
    m = bad.main()
    assert m.code == 0 and m.outputs["mounted"] == "false" and len(m.warnings) == 1, m.stdout


def test_installs_stickyci_when_the_runner_has_none(env: Env) -> None:
    # pip installs this repository (the action's own) into a venv under the tool cache, as on
    # a fresh runner; the next job on that runner reuses it.
    env.environ["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    first = job(env, "j1", key="k", path="d")
    first.environ["RUNNER_TOOL_CACHE"] = str(env.root / "toolcache")
    m = first.main()
    assert m.code == 0 and not m.warnings, m.stdout + m.stderr
    assert "installing stickyci" in m.stdout
    bin_ = Path(m.outputs["stickyci"])
    assert bin_.parent.parent.parent == env.root / "toolcache" / "stickyci"
    assert m.path_added == [str(bin_.parent)]  # later steps of the job find it on PATH
    (first.workspace / "d" / "f").write_text("x")
    assert first.post().outputs["committed-generation"] == "1"
    second = job(env, "j2", key="k", path="d")
    second.environ["RUNNER_TOOL_CACHE"] = str(env.root / "toolcache")
    m = second.main()
    assert "installing" not in m.stdout and m.outputs["stickyci"] == str(bin_)
    assert m.outputs["generation"] == "1"
