"""Attacks on the pipeline runner by the code it runs, each through the real ``stickyci run``.

A CI step is untrusted: it prints what it likes (no newline for megabytes, binary), writes
secrets where it can, sabotages the run directory within its reach, and the pipeline file's
templates come from the same author. None of it may make the runner record a failed job as a
success, commit a disk it should not, leave a run ``running``, hang, or keep a raw secret.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import Env

from stickyci.pipeline.masking import MaskedStream, Masker


def write(env: Env, text: str) -> Path:
    f = env.root / "p.yml"
    f.write_text(text)
    return f


def run(env: Env, pipeline: Path) -> tuple[int, dict[str, Any]]:
    proc = env.run("run", str(pipeline), "--json", check=False)
    assert proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def job(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(j for j in record["jobs"] if j["id"] == name)


def steps(j: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["state"]) for s in j["steps"]]


def disk_exists(env: Env, key: str) -> bool:
    proc = env.run("disk", "show", key, "--json", check=False)
    assert proc.returncode in (0, 3), proc.stderr  # 3: no such disk
    return proc.returncode == 0


def disk_file(env: Env, key: str, name: str) -> str:
    """A file's content in the latest generation of ``key``, mounted back for real."""
    where = env.root / f"check-{key}"
    env.run("disk", "mount", key, str(where))
    try:
        return (where / name).read_text()
    finally:
        env.run("disk", "unmount", str(where))


def history_state(env: Env, run_id: str) -> str:
    state: str = env.json("runs", "show", run_id)["state"]
    return state


def test_a_10_mb_line_without_newline_and_binary_output_leave_a_successful_job_whole(
        env: Env) -> None:
    # 10 MB with no newline, then bytes that are not UTF-8, then more; the job succeeds.
    p = write(env, r"""
jobs:
  a:
    disks: [{key: big-line, path: d}]
    steps:
      - name: flood
        run: |
          echo half > d/state
          head -c 10000000 /dev/zero | tr '\0' x
          printf '\xff\xfe\x00\xc3 binary \x80\n'
          head -c 300000 /dev/urandom
          echo done > d/state
      - {name: teardown, if: always(), run: "echo teardown ran"}
""")
    code, record = run(env, p)
    a = job(record, "a")
    assert code == 0 and record["state"] == "success", a["reason"]
    assert steps(a) == [("flood", "success"), ("teardown", "success")]
    log = Path(record["run_dir"]) / a["steps"][0]["log"]
    assert log.stat().st_size >= 10_000_000
    assert "\ufffd binary \ufffd" in log.read_text(encoding="utf-8")
    assert disk_file(env, "big-line", "state") == "done\n"
    assert history_state(env, record["id"]) == "success"


def test_a_70000_character_line_then_a_failure_is_a_failure_and_commits_nothing(
        env: Env) -> None:
    # Before: "chunk is longer than limit" killed the runner, the job was recorded as a
    # success with its half-done disk committed, teardown never ran, the run stayed running.
    marker = env.root / "teardown-ran"
    p = write(env, f"""
jobs:
  a:
    disks: [{{key: long-line, path: d}}]
    steps:
      - name: half done
        run: "echo half > d/state; python3 -c 'print(\\"y\\" * 70000)'; exit 3"
      - {{name: teardown, if: always(), run: "touch {marker}"}}
""")
    code, record = run(env, p)
    a = job(record, "a")
    assert code == 1 and record["state"] == "failure"
    assert (a["state"], a["reason"]) == ("failure", "step 'half done' exited 3")
    assert steps(a) == [("half done", "failure"), ("teardown", "success")]
    assert marker.exists()
    assert not disk_exists(env, "long-line")
    assert history_state(env, record["id"]) == "failure"


def test_an_internal_error_fails_the_job_commits_no_disk_and_still_tears_down(
        env: Env) -> None:
    # A genuine fault of the runner: the next step's log is where a full disk is (/dev/full,
    # which the step plants in the run directory, within its reach), so writing it fails with
    # ENOSPC while the step runs. Nothing is committed, not even the `always` disk.
    marker = env.root / "teardown-ran"
    p = write(env, f"""
jobs:
  a:
    disks:
      - {{key: fault-on-success, path: d}}
      - {{key: fault-always, path: e, commit: always}}
    steps:
      - name: sabotage
        run: mkdir -p ../../logs/a && ln -s /dev/full ../../logs/a/02-work.log
      - name: work
        run: "echo new > d/state; echo new > e/state; head -c 300000 /dev/zero | tr '\\\\0' z"
      - {{name: teardown, if: always(), run: "touch {marker}"}}
  after: {{needs: [a], steps: [{{run: "true"}}]}}
""")
    code, record = run(env, p)
    a = job(record, "a")
    assert code == 1 and record["state"] == "failure"
    assert a["state"] == "failure"
    assert a["reason"].startswith("step 'work' failed: internal error: OSError: [Errno 28]")
    assert steps(a) == [("sabotage", "success"), ("work", "failure"), ("teardown", "success")]
    assert marker.exists()
    assert [d["committed"] for d in a["disks"]] == [False, False]
    assert all(d["commit_reason"].startswith("internal error") for d in a["disks"])
    assert not disk_exists(env, "fault-on-success") and not disk_exists(env, "fault-always")
    assert job(record, "after")["state"] == "skipped"
    assert history_state(env, record["id"]) == "failure"
    summary = (Path(record["run_dir"]) / "summary.md").read_text()
    assert "internal error" in summary


@pytest.mark.parametrize("sabotage", ["mkfifo", "symlink", "directory"])
def test_a_step_cannot_hang_or_redirect_the_runner_through_its_outputs_file(
        env: Env, sabotage: str) -> None:
    # Before: a FIFO at $STICKYCI_OUTPUT blocked the runner forever, a directory was a
    # traceback after the disks had been committed.
    make = {"mkfifo": 'mkfifo "$STICKYCI_OUTPUT"',
            "symlink": 'echo v=1 > ../elsewhere; ln -s "$PWD/../elsewhere" "$STICKYCI_OUTPUT"',
            "directory": 'mkdir "$STICKYCI_OUTPUT"'}[sabotage]
    p = write(env, f"""
jobs:
  a:
    outputs: [v]
    disks: [{{key: outputs-{sabotage}, path: d}}]
    steps: [{{run: 'echo x > d/f; {make}'}}]
""")
    code, record = run(env, p)
    a = job(record, "a")
    assert code == 1 and a["state"] == "failure"
    assert "$STICKYCI_OUTPUT" in a["reason"] and "plain file" in a["reason"]
    assert not disk_exists(env, f"outputs-{sabotage}")


def test_a_background_process_holding_the_output_does_not_hang_the_step(env: Env) -> None:
    # Before: the step was over only when every holder of its stdout was (here: never).
    p = write(env, """
jobs:
  a:
    timeout: 2m
    steps:
      - {name: daemon, run: "sleep 3600 & echo started"}
      - {name: next, run: "echo next"}
""")
    code, record = run(env, p)
    a = job(record, "a")
    assert code == 0, a["reason"]
    assert steps(a) == [("daemon", "success"), ("next", "success")]
    assert a["steps"][0]["seconds"] < 60


SECRET_LINES = ["-----BEGIN TEST KEY-----", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
                "Z2hvc3Qtc2VjcmV0LWxpbmUtdGhyZWU=", "-----END TEST KEY-----"]


def test_a_multi_line_secret_leaves_no_line_anywhere_under_the_run_dir(env: Env) -> None:
    secret = "\n".join(SECRET_LINES) + "\n"
    env.environ["SIGNING_KEY"] = secret
    p = write(env, r"""
secrets: [SIGNING_KEY]
jobs:
  a:
    outputs: [first, second, whole]
    steps:
      - name: leak
        run: |
          echo "$SIGNING_KEY"
          printf '%s\n' "$SIGNING_KEY" | sed -n 3p | sed 's/^/line three: /'
          printf '%s\n' "$SIGNING_KEY" | tac
          # a secret straddling the runner's 64 KiB reads, on a line far over any limit
          printf '%0100000d%s%0100000d\n' 0 "$SIGNING_KEY" 0
          echo "first=$(printf '%s\n' "$SIGNING_KEY" | sed -n 2p)" >> "$STICKYCI_OUTPUT"
          echo "second=$(printf '%s\n' "$SIGNING_KEY" | sed -n 3p)" >> "$STICKYCI_OUTPUT"
          echo "whole=$SIGNING_KEY" >> "$STICKYCI_OUTPUT"
          exit 1
  b:
    needs: [a]
    if: always()
    steps:
      - run: echo "got ${{ needs.a.outputs.first }} ${{ needs.a.outputs.second }}"; exit 1
""")
    code, record = run(env, p)
    assert code == 1 and [j["state"] for j in record["jobs"]] == ["failure", "failure"]
    assert job(record, "a")["outputs"] == {"first": "***", "second": "***", "whole": "***"}
    root = Path(record["run_dir"])
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) >= 4  # two logs, summary.md, summary.json
    files += [f for f in env.cache.glob("runs.db*") if f.is_file()]
    with sqlite3.connect(env.cache / "runs.db") as db:  # and through SQLite, WAL or not
        stored = "".join(r[0] for r in db.execute("SELECT record FROM runs"))
    logs = "".join(f.read_text() for f in root.rglob("*.log"))
    assert "line three: ***" in logs and "got *** ***" in logs
    for line in SECRET_LINES:
        for f in files:
            assert line.encode() not in f.read_bytes(), f"{line!r} found in {f}"
        assert line not in stored
    assert not list(root.rglob("*.outputs"))


@pytest.mark.parametrize(("template", "message"), [
    ("${{ vars.pop('v') }}", "access to attribute 'pop' of 'dict' object is unsafe"),
    ("${{ range(100001) | list | length }}", "range() of 100001 items is over the limit"),
    ("${{ 'x' * 10000000000 }}", "over the limit of 100000 items"),
    ("${{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
])
def test_a_hostile_template_is_one_line_naming_the_field(env: Env, template: str,
                                                         message: str) -> None:
    p = write(env, f"""
vars: {{v: 1}}
jobs:
  a:
    steps:
      - run: "echo ok"
      - run: "echo {template}"
""")
    proc = env.run("run", str(p), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"stickyci: error: {p}:")
    assert "jobs.a.steps[1].run: template error" in lines[0] and message in lines[0]


def test_a_template_in_an_if_cannot_mutate_vars(env: Env) -> None:
    p = write(env, """
vars: {v: 1}
jobs:
  a: {if: "vars.pop('v')", steps: [{run: "true"}]}
  b: {steps: [{run: "test ${{ vars.v }} = 1"}]}
""")
    proc = env.run("run", str(p), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "jobs.a.if" in proc.stderr
    assert "unsafe" in proc.stderr and os.path.basename(p) in proc.stderr


def test_job_ids_and_reasons_are_never_terminal_control_sequences(env: Env) -> None:
    # A matrix value (from a services config the pull request can edit) with an escape
    # sequence that would clear the screen, and rich markup that would restyle the table.
    p = write(env, r"""
jobs:
  a:
    matrix: {axes: {svc: ["evil\e[2J\e]0;owned\a[bold red]x"]}}
    steps: [{run: "exit 1"}]
""")
    proc = env.run("run", str(p), check=False)
    assert proc.returncode == 1
    shown = env.run("runs", "show", proc.stdout.split()[1].rstrip(":"))
    for text in (proc.stdout, proc.stderr, shown.stdout):
        assert "\x1b" not in text and "\a" not in text
    assert r"evil\x1b[2J" in proc.stdout and r"evil\x1b[2J" in shown.stdout


def test_streamed_masking_is_the_masking_of_the_whole_text() -> None:
    # However the output is cut into reads (mid-secret, mid-UTF-8 character), what is logged
    # is what masking the whole output at once gives.
    rng = random.Random(7)
    alphabet = "ab\né"
    for _ in range(3000):
        secrets = {f"S{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 9)))
                   for i in range(rng.randint(1, 3))}
        mask = Masker(secrets)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        data, stream, got, at = text.encode(), MaskedStream(mask), [], 0
        while at < len(data):
            step = rng.randint(1, 9)
            got.append(stream.feed(data[at:at + step]))
            at += step
        got.append(stream.close())
        assert "".join(got) == mask(text), (secrets, text)


def test_a_run_its_executor_gives_up_on_is_closed_as_failed_in_history(env: Env) -> None:
    # Before: the error escaped the executor and the run stayed `running` in history forever.
    p = write(env, "jobs:\n  a: {steps: [{run: 'true'}]}\n")
    proc = env.run("run", str(p), "--executor", "dask", "--scheduler", "tcp://127.0.0.1:1",
                   "--connect-timeout", "1s", check=False)
    assert proc.returncode == 2 and "cannot reach the Dask scheduler" in proc.stderr
    (row,) = env.json("runs", "ls")
    assert (row["state"], row["failed"]) == ("failure", 1)
    a = env.json("runs", "show", row["id"])["jobs"][0]
    assert a["state"] == "failure" and a["reason"].startswith("run stopped: cannot reach")
