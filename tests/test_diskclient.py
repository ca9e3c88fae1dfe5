"""The job's disk client: a failed ``stickyci disk --json`` comes back with its error class."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import Env

from stickyci.pipeline.diskclient import DiskClient, DiskFailure
from stickyci.pipeline.masking import Masker


def test_a_failure_keeps_its_kind_and_exit_code(env: Env) -> None:
    client = DiskClient(env.environ, None, Masker({"S": "nonexist"}))
    got = asyncio.run(client.commit(env.root / "nonexist", "on-change"))
    assert isinstance(got, DiskFailure)
    assert (got.kind, got.exit_code) == ("UsageError", 2)
    assert got.message == f"path {env.root}/*** does not exist"


def test_a_command_that_wrote_no_error_body_is_told_by_its_last_line() -> None:
    client = DiskClient(None, None, Masker({}))
    got = client._failure(9, None, "Traceback (most recent call last):\nKeyError: 'x'\n")
    assert got == DiskFailure("KeyError: 'x'", "", 9)
    body = {"error": "disk  ci\nis busy", "kind": "BusyError", "exit_code": 6}
    assert client._failure(6, body, "") == DiskFailure("disk ci is busy", "BusyError", 6)


def test_a_mount_returns_its_document(env: Env, tmp_path: Path) -> None:
    client = DiskClient(env.environ, None, Masker({}))
    got = asyncio.run(client.mount("ci-x", tmp_path / "d", "copy", False))
    assert not isinstance(got, DiskFailure)
    assert got["fresh"] is True
    assert not isinstance(asyncio.run(client.discard(tmp_path / "d")), DiskFailure)
