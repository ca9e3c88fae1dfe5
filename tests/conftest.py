"""Shared fixtures: an isolated store and cache per test, and the CLI run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from server import Server, start_server

IS_ROOT = os.geteuid() == 0


@dataclass
class Env:
    """An isolated stickyci environment: its store, cache dir and process environment."""

    root: Path
    store: Path
    cache: Path
    environ: dict[str, str]

    def run(self, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``stickyci ARGS`` as a subprocess."""
        proc = subprocess.run([sys.executable, "-m", "stickyci", *args], env=self.environ,
                              capture_output=True, text=True, timeout=300, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"stickyci {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        """Run with ``--json`` and parse the output."""
        return json.loads(self.run(*args, "--json").stdout)


def _unmount_under(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", p], check=False)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A private store and cache; overlay mounts left behind are cleaned up."""
    store, cache = tmp_path / "store", tmp_path / "cache"
    monkeypatch.setenv("STICKYCI_STORE", f"file://{store}")
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(cache))
    yield Env(tmp_path, store, cache, dict(os.environ))
    _unmount_under(tmp_path)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One stickyci server for a module's tests that neither restart it nor need its flags."""
    with start_server(tmp_path_factory.mktemp("srv")) as server:
        yield server
