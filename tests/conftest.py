"""Shared fixtures: an isolated store and cache per test, servers, and the ``root`` marker.

Plain helpers (``Env``, ``wait_for``, ``STRATEGIES``) live in ``helpers.py``; test modules import
them from there, never from this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import IS_ROOT, Env, tmpfs, unmount_under
from server import Server, start_server

# The S3 server fixture, for every module that asks for it by name.
pytest_plugins = ["seaweed"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip the tests marked ``root`` (overlayfs, tmpfs and loop mounts) when not root."""
    if not IS_ROOT and item.get_closest_marker("root") is not None:
        pytest.skip("needs root (overlayfs, tmpfs or loop mounts)")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A private store and cache; overlay mounts left behind are cleaned up."""
    store, cache = tmp_path / "store", tmp_path / "cache"
    monkeypatch.setenv("STICKYCI_STORE", f"file://{store}")
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(cache))
    yield Env(tmp_path, store, cache, dict(os.environ))
    unmount_under(tmp_path)


@pytest.fixture
def small_store(env: Env) -> Iterator[Env]:
    """The env's store on an 8 MiB tmpfs (mark the test ``root``)."""
    with tmpfs(env.store, "8m"):
        yield env


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One stickyci server for a module's tests that neither restart it nor need its flags."""
    with start_server(tmp_path_factory.mktemp("srv")) as server:
        yield server
