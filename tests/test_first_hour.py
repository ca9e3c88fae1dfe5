"""What a newcomer meets in the first hour: one-line errors naming what is at fault, typos with
suggestions (all of them at once), ``disk ls`` with long keys, a new disk committed unchanged,
commit figures that tell new content from reused, and ``examples/quickstart.sh`` run as the
README says (the venv not on PATH).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from helpers import Env, MiB, one_line_error

from stickyci.cli.main import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.sh"


def stickyci(*args: str) -> subprocess.CompletedProcess[str]:
    """``stickyci ARGS`` in this process (the console script's ``main``, exit code and all):
    what a subprocess would print, without an interpreter start per call."""
    out, err = io.StringIO(), io.StringIO()
    log = logging.getLogger("stickyci")
    handlers, level = log.handlers[:], log.level
    code: Any = 0
    with mock.patch.object(sys, "argv", ["stickyci", *args]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    log.handlers[:], log.level = handlers, level
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def ok(*args: str) -> str:
    """``stickyci ARGS`` in this process; its stdout, after checking it succeeded."""
    done = stickyci(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_json(*args: str) -> Any:
    """``stickyci ARGS --json`` in this process, parsed."""
    return json.loads(ok(*args, "--json"))


# --- one-line errors --------------------------------------------------------------------------

def test_serve_on_a_port_in_use_names_the_address_its_holder_and_what_to_do(env: Env) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = env.run("serve", "--listen", f"127.0.0.1:{port}", "--state-dir",
                       str(env.root / "state"), check=False)
    line = one_line_error(proc)
    assert proc.returncode == 6  # busy, not 3 ("not found") as uvicorn's own exit said
    assert f"127.0.0.1:{port} is already in use by pid {os.getpid()} (" in line
    assert "--listen" in line


def test_serve_on_an_address_not_of_this_machine_is_one_line(env: Env) -> None:
    proc = env.run("serve", "--listen", "192.0.2.1:8471", "--state-dir",
                   str(env.root / "state"), check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "192.0.2.1:8471" in line and "127.0.0.1:8471" in line


@pytest.mark.parametrize("args", [
    ["run", "{root}/missing.yml"],
    ["bench", "{root}/missing.yml", "--runs", "1"],
])
def test_a_missing_pipeline_file_is_one_line_naming_it(env: Env, args: list[str]) -> None:
    proc = stickyci(*(a.format(root=env.root) for a in args))
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert f"'{env.root}/missing.yml' does not exist" in line and "--help" in line


@pytest.mark.parametrize(("args", "needle"), [
    (["disk", "commit", "{root}/nowhere"], "path {root}/nowhere does not exist"),
    (["disk", "unmount", "{root}/nowhere"], "path {root}/nowhere does not exist"),
    (["disk", "mount", "k", "{root}/a-file"], "mount path {root}/a-file is not a directory"),
    (["disk", "commit", "{root}"], "{root} is not a stickyci mount"),
    (["disk", "mount", "k"], "Missing argument 'PATH'"),
])
def test_every_path_argument_is_checked_in_one_line(env: Env, args: list[str],
                                                    needle: str) -> None:
    (env.root / "a-file").write_text("x")
    proc = stickyci(*(a.format(root=env.root) for a in args))
    assert proc.returncode == 2
    assert needle.format(root=env.root) in one_line_error(proc)


@pytest.mark.parametrize("store", ["/plain/path", "relative/store"])
def test_a_store_without_a_scheme_is_refused_with_the_url_to_use(env: Env, store: str) -> None:
    proc = stickyci("disk", "ls", "--store", store)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert f"store URL '{store}' has no scheme" in line
    assert f"file://{Path(store).absolute()}" in line


def test_serve_refuses_a_store_without_a_scheme(env: Env) -> None:
    proc = env.run("serve", "--store", str(env.store), "--listen", "127.0.0.1:1",
                   "--state-dir", str(env.root / "state"), check=False)
    assert proc.returncode == 2 and f"file://{env.store}" in one_line_error(proc)


def test_a_key_too_long_says_its_limit_in_characters(env: Env) -> None:
    proc = stickyci("disk", "mount", "k" * 201, str(env.root / "ws"))
    line = one_line_error(proc)
    assert proc.returncode == 2 and "at most 200 characters" in line


def test_kill_holders_says_what_it_killed(env: Env) -> None:
    ws = env.root / "ws"
    ok("disk", "mount", "held", str(ws), "--strategy", "copy")
    holder = subprocess.Popen(["sleep", "600"], cwd=ws)
    try:
        done = ok("disk", "commit", str(ws), "--kill-holders")
    finally:
        holder.kill()
        holder.wait()
    assert f"killed pid {holder.pid} (sleep 600), which held {ws}\n" in done
    assert holder.returncode == -15  # SIGTERM, the first thing it was sent


# --- pipeline typos -----------------------------------------------------------------------------

TWO_TYPOS = """\
jobs:
  build:
    steps:
      - run: make
  deploy:
    need: [build]
    steps:
      - name: ship
        rn: ./ship
"""


def test_two_typos_are_reported_at_once_with_suggestions(env: Env) -> None:
    pipeline = env.root / "p.yml"
    pipeline.write_text(TWO_TYPOS)
    proc = stickyci("run", str(pipeline))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"stickyci: error: {pipeline}: 2 problems",
        f"  {pipeline}:6: jobs.deploy.need: unknown field; did you mean `needs`?",
        f"  {pipeline}:9: jobs.deploy.steps[0].rn: unknown field; did you mean `run`?",
    ]


@pytest.mark.parametrize(("text", "line"), [
    ("jobs:\n  a:\n    matrix: {from: s.json, selct: x}\n    steps: [{run: x}]\n",
     "p.yml:3: jobs.a.matrix.selct: unknown field; did you mean `select`?"),
    ("jobs:\n  a:\n    disks: [{key: k, pth: d}]\n    steps: [{run: x}]\n",
     "p.yml:3: jobs.a.disks[0].pth: unknown field; did you mean `path`?"),
    ("jbos:\n  a: {steps: [{run: x}]}\n",
     "p.yml:1: jbos: unknown field; did you mean `jobs`?"),
    ("jobs:\n  a:\n    zzz: 1\n    steps: [{run: x}]\n",
     "p.yml:3: jobs.a.zzz: unknown field; fields here: needs, if, matrix,"),
    ("jobs:\n  biuld: {steps: [{run: x}]}\n  b: {needs: [build], steps: [{run: x}]}\n",
     "p.yml:3: jobs.b.needs: unknown job 'build'; did you mean `biuld`?"),
])
def test_one_typo_is_one_line_with_its_place_and_a_suggestion(env: Env, text: str,
                                                              line: str) -> None:
    (env.root / "p.yml").write_text(text)
    proc = stickyci("run", str(env.root / "p.yml"))
    assert proc.returncode == 2
    assert one_line_error(proc).startswith(f"stickyci: error: {env.root}/{line}")


# --- disks ----------------------------------------------------------------------------------------

def test_disk_ls_lines_up_a_200_character_key(env: Env) -> None:
    long_key = "k" * 200
    for key in ("short", long_key):
        ws = env.root / key[:10]
        ok("disk", "mount", key, str(ws), "--strategy", "copy")
        (ws / "f").write_bytes(b"x" * 1000)
        ok("disk", "commit", str(ws))
    header, *rows = ok("disk", "ls").splitlines()
    assert sorted(r.split()[0] for r in rows) == [long_key, "short"]
    gen_end = header.index("GEN") + len("GEN")
    size_end = header.index("SIZE") + len("SIZE")
    for row in rows:
        assert row[gen_end - 1] == "1" and row[gen_end] == " ", row
        assert row[size_end - len("1000 B"):size_end] == "1000 B", row


def test_a_new_disk_committed_unchanged_exists_and_can_be_removed(env: Env) -> None:
    ws = env.root / "ws"
    ok("disk", "mount", "empty", str(ws), "--strategy", "copy")
    done = as_json("disk", "commit", str(ws))
    assert done["committed"] and done["generation"] == 1 and done["files"] == 0
    assert [d["key"] for d in as_json("disk", "ls")] == ["empty"]
    again = as_json("disk", "mount", "empty", str(ws), "--strategy", "copy")
    assert not again["fresh"] and again["generation"] == 1
    assert as_json("disk", "commit", str(ws))["committed"] is False  # unchanged: no new gen
    assert ok("disk", "rm", "empty").strip() == "removed disk empty"
    assert as_json("disk", "ls") == []


def test_commit_figures_tell_new_content_from_reused(env: Env) -> None:
    ws = env.root / "ws"
    big = os.urandom(2 * MiB)
    ok("disk", "mount", "figures", str(ws), "--strategy", "copy")
    (ws / "big.bin").write_bytes(big)
    first = as_json("disk", "commit", str(ws))
    assert (first["new_bytes"], first["reused_bytes"]) == (2 * MiB, 0)

    ok("disk", "mount", "figures", str(ws), "--strategy", "copy")
    (ws / "copy.bin").write_bytes(big)  # deduplicated: the store holds every chunk of it
    (ws / "note.txt").write_bytes(b"a one-line change\n")
    second = as_json("disk", "commit", str(ws))
    assert second["size"] == 4 * MiB + 18
    assert (second["new_bytes"], second["reused_bytes"]) == (18, 4 * MiB)
    # What was written is that small file and the manifest, nothing of the 2 MiB copy.
    assert 0 < second["manifest_bytes"] < second["stored_bytes"] < 4096

    ok("disk", "mount", "figures", str(ws), "--strategy", "copy")
    (ws / "note.txt").write_bytes(b"a one-line change, again\n")
    line = ok("disk", "commit", str(ws)).strip()
    assert re.fullmatch(r"committed figures generation 3: \+0 -0 ~1 paths; of 4\.0 MiB in 3 "
                        r"files, 25 B new and 4\.0 MiB reused; stored \d+ B content \+ \d+ B "
                        r"manifest in [\d.]+s", line), line


# --- the quickstart, as the README runs it ---------------------------------------------------

def _fresh_shell(env: Env, path: str) -> dict[str, str]:
    """The test's store and cache, and a PATH with no venv on it."""
    return {**env.environ, "PATH": path, "HOME": str(env.root)}


def test_quickstart_runs_from_a_fresh_shell(env: Env) -> None:
    if not (REPO / ".venv" / "bin" / "stickyci").exists():
        pytest.skip("no .venv in the repository (the README's install makes one)")
    done = subprocess.run([str(QUICKSTART)], env=_fresh_shell(env, "/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    commits = [ln for ln in done.stdout.splitlines() if ln.startswith("committed ")]
    assert len(commits) == 2
    # The warm job changes one line of one file: a few bytes are new, the rest reused.
    warm = re.search(r"\+0 -0 ~1 paths; of ([\d.]+) KiB in \d+ files, (\d+) B new and "
                     r"([\d.]+) KiB reused", commits[1])
    assert warm and int(warm[2]) < 100 and warm[3] == warm[1], commits[1]
    key = commits[0].split()[1]
    assert "M deps/dep_7.c" in done.stdout
    assert done.stdout.rstrip().endswith(f"removed disk {key}")


def test_quickstart_outside_the_repo_uses_stickyci_on_path_or_says_it_is_missing(
        env: Env) -> None:
    elsewhere = env.root / "elsewhere" / "examples"
    elsewhere.mkdir(parents=True)
    shutil.copy(QUICKSTART, elsewhere)
    bin_dir = env.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "stickyci").write_text(f"#!/bin/sh\nexec {sys.executable} -m stickyci \"$@\"\n")
    (bin_dir / "stickyci").chmod(0o755)
    done = subprocess.run(["bash", str(elsewhere / "quickstart.sh")],
                          env=_fresh_shell(env, f"{bin_dir}:/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "removed disk quickstart-" in done.stdout

    missing = subprocess.run(["bash", str(elsewhere / "quickstart.sh")],
                             env=_fresh_shell(env, "/usr/bin:/bin"), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 127
    assert missing.stderr.count("\n") == 1 and "stickyci is neither in" in missing.stderr
