"""The disk client of a job: ``stickyci disk … --json`` in a subprocess, its document or its error.

A subprocess keeps the event loop free while a commit forks its workers, and runs exactly what
a user would. A failed command prints a JSON error body (``{"error", "kind", "exit_code"}``,
see :mod:`stickyci.cli.disk`); it is read back as a :class:`DiskFailure`, so the error class
survives the process boundary. A command that died before writing one (killed, a crash) is
described by the end of what it printed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .masking import Masker
from .stop import Guard, kill_group


@dataclass(frozen=True, slots=True)
class DiskFailure:
    """A ``stickyci disk`` command that failed."""

    message: str  # one line, masked
    kind: str  # the error class (``ConflictError``…), or "" when it wrote no error body
    exit_code: int


class DiskClient:
    """Runs ``stickyci disk`` commands for one job."""

    def __init__(self, env: Mapping[str, str] | None, guard: Guard | None, mask: Masker) -> None:
        """``env`` is the commands' environment (None: inherited); ``guard`` is told about
        each command's process group; ``mask`` is applied to every error message."""
        self.env, self.guard, self.mask = env, guard, mask

    async def mount(self, key: str, path: Path, strategy: str,
                    trust_owners: bool) -> dict[str, Any] | DiskFailure:
        """``stickyci disk mount``: its JSON document, or why it failed."""
        return await self.run("mount", key, str(path), "--strategy", strategy,
                              *(["--trust-owners"] if trust_owners else []))

    async def commit(self, path: Path, mode: str) -> dict[str, Any] | DiskFailure:
        """``stickyci disk commit``: its JSON document, or why it failed."""
        return await self.run("commit", str(path), "--mode", mode)

    async def discard(self, path: Path) -> dict[str, Any] | DiskFailure:
        """``stickyci disk unmount --kill-holders``: drop what the mount holds, stragglers
        included."""
        return await self.run("unmount", str(path), "--kill-holders")

    async def run(self, *args: str) -> dict[str, Any] | DiskFailure:
        """Run ``stickyci disk ARGS --json``: its JSON document, or why it failed."""
        guard = self.guard
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stickyci", "disk", *args, "--json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env,
            # Guarded: a group of its own (with the workers a commit forks), so the guard can
            # end all of it and a commit never outlives the process that ran the job.
            start_new_session=guard is not None)
        if guard:
            guard.add(proc.pid)
        try:
            out, err = await proc.communicate()
        finally:
            if guard:
                kill_group(proc, signal.SIGKILL)
                guard.discard(proc.pid)
        if proc.returncode == 0:
            doc: dict[str, Any] = json.loads(out) if out.strip() else {}
            return doc
        return self._failure(proc.returncode or 1, out, err)

    def _failure(self, code: int, out: bytes, err: bytes) -> DiskFailure:
        try:
            body = json.loads(out)
            return DiskFailure(self.mask(" ".join(str(body["error"]).split())),
                               str(body.get("kind", "")), code)
        except (ValueError, TypeError, KeyError):
            pass
        lines = err.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "it printed nothing"
        return DiskFailure(self.mask(last.removeprefix("stickyci: error: ")[:300]), "", code)
