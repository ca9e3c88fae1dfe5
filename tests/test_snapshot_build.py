"""Building a snapshot in forked workers: how files are grouped into tasks, and what a
forked fill leaves behind in the committing process."""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
from pathlib import Path

import pytest

from stickyci.errors import BusyError
from stickyci.forked import forked_map
from stickyci.fsutil import Tree
from stickyci.snapshot import (
    FILE,
    Content,
    ContentFill,
    Entry,
    build,
    fill_content,
    load_manifest,
    restore,
    scan_tree,
    snapshot_tree,
)
from stickyci.store import LocalBackend, ObjectStore

KiB = 1 << 10


def _file(i: int, size: int) -> Entry:
    return Entry(f"f{i:03}", FILE, 0o644, 0, 0, 0, size=size)


@pytest.mark.parametrize("sizes", [
    [10, 10, 10, 10, 10, 10, 10, 10, 10],  # small files: runs that close at the limit
    [5, 200, 5, 5, 90, 5, 5, 5, 60, 5],    # a big file is a task of its own
    [20, 20, 20, 20, 20, 300, 20],         # the biggest task comes late in the scan
    [300],
    [],
])
def test_tasks_are_bounded_runs_taken_largest_first(sizes: list[int]) -> None:
    limit = 100 * KiB
    entries = [_file(i, n * KiB) for i, n in enumerate(sizes)]
    tasks = build._Tasks(limit)
    made = [tasks.add(e) for e in entries]
    tasks.close()
    order = []
    while tasks.waiting:
        order.append(tasks.take())
    groups = [tasks.batches[i] for i in order]
    cost = {id(g): sum(e.size + 4096 for e in g) for g in groups}

    # every file once, every task taken once; a file of the limit or more alone, the others
    # in runs of the scan's order that close once they reach the limit (the last one may
    # fall short of it)
    assert sorted(order) == list(range(len(tasks.batches)))
    assert sorted(e.path for g in groups for e in g) == [e.path for e in entries]
    big = [e for e in entries if e.size + 4096 >= limit]
    assert [g for g in groups if g[0] in big] == [[e] for e in sorted(
        big, key=lambda e: e.size, reverse=True)]
    small = [e for e in entries if e not in big]
    runs = sorted((g for g in groups if g[0] not in big), key=lambda g: small.index(g[0]))
    assert [e for g in runs for e in g] == small
    assert all(cost[id(g)] >= limit > cost[id(g)] - g[-1].size - 4096 for g in runs[:-1])
    assert not runs or cost[id(runs[-1])] - runs[-1][-1].size - 4096 < limit
    # a task is made as soon as the scan has handed over its last file; only a short last
    # run waits for the scan's end
    assert sum(made) == len(groups) - (bool(runs) and cost[id(runs[-1])] < limit)
    # the biggest task first, so none is left for one worker alone at the end
    assert [cost[id(g)] for g in groups] == sorted(cost.values(), reverse=True)


@pytest.fixture
def forked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill in forked workers whatever the size, several small batches of a few files."""
    monkeypatch.setattr(build, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(build, "_BATCH_BYTES", 64 * KiB)


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"d{i % 3}/f{i}": os.urandom(1000 * (i + 1)) for i in range(24)}
    files["big"] = os.urandom(300 * KiB)  # several chunks, a batch of its own
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_forked_fill_round_trips_and_leaves_the_collector_as_it_was(
        tmp_path: Path, forked: None) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    files = _tree(src)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    frozen = gc.get_freeze_count()
    snap, _ = snapshot_tree(store, str(src))
    assert gc.get_freeze_count() == frozen

    restore(ObjectStore(LocalBackend(tmp_path / "store")), load_manifest(store, snap), dst)
    assert {rel: (dst / rel).read_bytes() for rel in files} == files


def test_workers_start_while_the_scan_is_still_handing_files_over(
        tmp_path: Path, forked: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = _tree(src)
    os.link(src / "big", src / "d0" / "big-again")  # read once, by whichever worker
    files["d0/big-again"] = files["big"]
    entries = scan_tree(str(src)).todo
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    with ContentFill(store) as fill:
        fill.read_from(Tree.at(src))
        assert not multiprocessing.active_children()
        fill.add(entries[0])
        assert multiprocessing.active_children()  # before the scan has handed over the rest
        for e in entries[1:]:
            fill.add(e)
        fill.finish()
    assert not multiprocessing.active_children()

    again = Content(ObjectStore(LocalBackend(tmp_path / "store")))
    assert {e.path: b"".join(again.read(ref, e.path) for ref in e.chunks)
            for e in entries} == files


def test_workers_start_only_with_enough_content_beside_the_largest_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker reads a file however big it is: the workers are forked only once there is
    ``PARALLEL_MIN_BYTES`` of content to read beside the largest file, not for one big file
    and a few small ones (read here, without the forks' cost)."""
    monkeypatch.setattr(build, "PARALLEL_MIN_BYTES", 256 * KiB)
    monkeypatch.setattr(build, "_BATCH_BYTES", 64 * KiB)  # every file a task: handed out at once
    src = tmp_path / "src"
    src.mkdir()
    files = {"big": os.urandom(1024 * KiB)} | {f"s{i}": os.urandom(100 * KiB) for i in range(3)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    entries = scan_tree(str(src)).todo
    assert [e.path for e in entries] == list(files)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    with ContentFill(store) as fill:
        fill.read_from(Tree.at(src))
        for e in entries[:3]:  # 1 MiB, and 200 KiB beside it
            fill.add(e)
        assert not multiprocessing.active_children()
        fill.add(entries[3])  # 300 KiB beside it
        assert multiprocessing.active_children()
        fill.finish()
    again = Content(ObjectStore(LocalBackend(tmp_path / "store")))
    assert {e.path: b"".join(again.read(ref, e.path) for ref in e.chunks)
            for e in entries} == files


def _faults_of_a_reused_buffer(size: int) -> int:
    """Page faults of filling a ``size``-byte buffer four times, freeing it in between."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        buf = b"x" * size  # written whole: every page touched
        del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_worker_keeps_the_memory_it_frees_for_the_next_buffer() -> None:
    """A forked worker reuses the memory of a big buffer it freed instead of faulting fresh
    pages in for the next one (glibc would give a 40 MiB block back to the kernel at once)."""
    size = 40 << 20
    [faults] = forked_map(_faults_of_a_reused_buffer, [size], workers=1)
    assert faults < 1.5 * size / resource.getpagesize()


def test_a_failed_forked_fill_unfreezes_the_collector(tmp_path: Path, forked: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    scan = scan_tree(str(src))
    (src / "d1" / "f4").unlink()  # gone between the scan and the read
    frozen = gc.get_freeze_count()
    with pytest.raises(BusyError, match="f4"):
        fill_content(ObjectStore(LocalBackend(tmp_path / "store")), str(src), scan.todo)
    assert gc.get_freeze_count() == frozen
