"""Shared fixtures: an isolated store and cache per test, servers, and the ``root`` and
``slow`` markers.

Plain helpers (``Env``, ``wait_for``, ``STRATEGIES``) live in ``helpers.py``; test modules import
them from there, never from this file.

``pytest -m "not slow"`` is the quick run for day-to-day work (about a minute on two busy
cores); CI runs everything. A module is slow unless it is listed in ``QUICK``: servers, S3,
Dask, Nix, Node clients and whole example pipelines take minutes together, and a module left
out by mistake only makes the quick run smaller, never slower. A test of a quick module that
takes seconds on its own is listed in ``SLOW_TESTS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import IS_ROOT, Env, tmpfs, unmount_under
from server import Server, start_server

# The S3 server and browser fixtures, for every module that asks for them by name.
pytest_plugins = ["seaweed", "browser"]

QUICK = frozenset({
    "test_chunking", "test_diskclient", "test_disks_cli", "test_first_hour", "test_history",
    "test_holders", "test_http_inprocess", "test_pipeline_plan", "test_pipeline_run",
    "test_adopt_base", "test_policy", "test_public_api", "test_step_lifetime", "test_store",
    "test_summary", "test_watchdog",
})
# Five seconds or more each here (pytest --durations), with quicker tests of the same code.
SLOW_TESTS = frozenset({
    "test_bench_compares_cold_and_warm",
    "test_disks_hand_off_between_jobs_and_cold_commits_nothing",
    "test_holder_ignoring_sigterm_is_killed",
})


def pytest_configure(config: pytest.Config) -> None:
    """Register ``slow``, so ``-m "not slow"`` is the quick run."""
    config.addinivalue_line("markers", "slow: left out of the quick run (pytest -m 'not slow')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of a module outside ``QUICK``, and every test in ``SLOW_TESTS``,
    ``slow``."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.stem not in QUICK or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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
