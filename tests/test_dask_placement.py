"""Placement on a Dask cluster as a pure rule: warm first, but never wait for warmth."""

from __future__ import annotations

import pytest

from stickyci.pipeline.executors.dask import WorkerView, choose_worker


def w(address: str, *, busy: int = 0, nthreads: int = 1, warmth: int = 0,
      cpu: float = 2, used: float = 0) -> WorkerView:
    return WorkerView(address, nthreads, {"cpu": cpu}, busy, {"cpu": used} if used else {},
                      warmth)


@pytest.mark.parametrize(("workers", "need", "unplaced", "chosen"), [
    # the warm worker when it is free
    ([w("a"), w("b", warmth=10), w("c")], {}, 0, "b"),
    # the warmest of several warm ones
    ([w("a", warmth=5), w("b", warmth=10)], {}, 0, "b"),
    # the warm worker is busy: an idle cold one, never a queue behind the warm one
    ([w("a"), w("b", busy=1, warmth=10)], {}, 0, "a"),
    # a worker with a thread left counts as free; among equals the least busy
    ([w("a", nthreads=2, busy=1), w("b", nthreads=2)], {}, 0, "b"),
    ([w("a", nthreads=2, busy=1, warmth=3), w("b", nthreads=2)], {}, 0, "a"),
    # nobody free: the scheduler decides
    ([w("a", busy=1, warmth=10), w("b", busy=1)], {}, 0, None),
    # resources: only a worker that offers them, warm or not
    ([w("a", warmth=10), w("b", cpu=4)], {"cpu": 4}, 0, "b"),
    # ... and has them free: our job there holds 2 of its 4
    ([w("a"), w("b", cpu=4, used=2, nthreads=2, busy=1)], {"cpu": 4}, 0, None),
    ([w("a", busy=1), w("b", cpu=4, used=2, nthreads=2, busy=1)], {"cpu": 2}, 0, "b"),
    # jobs already submitted without a worker take the free threads first
    ([w("a"), w("b", warmth=10)], {}, 2, None),
    ([w("a"), w("b", warmth=10)], {}, 1, "b"),
    ([], {}, 0, None),
])
def test_choose_worker(workers: list[WorkerView], need: dict[str, float], unplaced: int,
                       chosen: str | None) -> None:
    assert choose_worker(workers, need, unplaced) == chosen
