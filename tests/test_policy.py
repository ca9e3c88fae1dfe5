"""Eviction policy as tables (pure functions), and the base cache never dropping a live base."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import STRATEGIES, Env

from stickyci import disks
from stickyci.digest import Digest
from stickyci.disks import api, basecache
from stickyci.disks.policy import Used, over_budget, unused_for
from stickyci.errors import UsageError
from stickyci.units import parse_duration, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("text", "seconds"), [
    ("0s", 0),
    ("90s", 90),
    ("15m", 15 * 60),
    ("12h", 12 * 3600),
    ("7d", 7 * 86400),
    ("2w", 14 * 86400),
    ("1.5h", 5400),
    ("0.5d", 43200),
    ("  3d ", 3 * 86400),
    ("3 d", 3 * 86400),
    ("0001m", 60),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", " ", "7", "d", "soon", "-1d", "+1d", "1y", "1dd", "1d2h", "1.d", ".5d", "1e3s", "1 day",
    "1D", "inf", "nan",
])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0),
    ("1024", 1024),
    ("1k", KiB),
    ("1K", KiB),
    ("1.5k", 1536),
    ("500M", 500 * MiB),
    ("500MB", 500 * MiB),
    ("500MiB", 500 * MiB),
    ("500mib", 500 * MiB),
    ("20G", 20 * GiB),
    ("20 G", 20 * GiB),
    (" 20g ", 20 * GiB),
    ("2T", 2 * TiB),
    ("0.5g", GiB // 2),
    ("7b", 7),
])
def test_parse_size(text: str, size: int) -> None:
    got = parse_size(text)
    assert got == size and isinstance(got, int)


@pytest.mark.parametrize("text", [
    "", "G", "-1G", "+1G", "1.2.3G", "1P", "1E", "12 bytes", "1GG", "one", "1e9", "1,5G", "inf",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


NOW = 1_000_000.0
DAY = 86400.0


@pytest.mark.parametrize(("ages", "ttl", "stale"), [
    ({}, DAY, []),
    ({"a": 0}, DAY, []),
    ({"a": 0}, 0, ["a"]),  # a TTL of 0 evicts even what was used this instant
    ({"a": DAY}, DAY, ["a"]),  # exactly the TTL old counts as unused for it
    ({"a": DAY - 1}, DAY, []),
    ({"a": 3 * DAY, "b": 10 * DAY, "c": 0.5 * DAY}, DAY, ["b", "a"]),  # oldest first
    ({"b": 2 * DAY, "a": 2 * DAY, "c": 2 * DAY}, DAY, ["a", "b", "c"]),  # ties by name
    ({"future": -DAY, "old": 2 * DAY}, DAY, ["old"]),  # clock skew: used "in the future"
    ({"a": 8 * DAY, "b": 6 * DAY}, 7 * DAY, ["a"]),
])
def test_unused_for(ages: dict[str, float], ttl: float, stale: list[str]) -> None:
    items = [Used(name, 123, NOW - age) for name, age in ages.items()]
    assert unused_for(items, NOW, ttl) == stale
    assert unused_for(iter(items), NOW, ttl) == stale  # any iterable, consumed once


# name -> (size, last_used); the result is the LRU-first list of names to drop
@pytest.mark.parametrize(("items", "limit", "keep", "drop"), [
    ({}, 0, set(), []),
    ({"a": (10, 1)}, 10, set(), []),  # exactly at the limit fits
    ({"a": (10, 1)}, 9, set(), ["a"]),
    ({"a": (10, 1), "b": (10, 2), "c": (10, 3)}, 25, set(), ["a"]),
    ({"a": (10, 1), "b": (10, 2), "c": (10, 3)}, 15, set(), ["a", "b"]),
    ({"a": (10, 1), "b": (10, 2), "c": (10, 3)}, 0, set(), ["a", "b", "c"]),
    ({"c": (10, 1), "b": (10, 2), "a": (10, 3)}, 15, set(), ["c", "b"]),  # by use, not name
    ({"b": (10, 1), "a": (10, 1), "c": (10, 1)}, 15, set(), ["a", "b"]),  # ties by name
    ({"a": (10, 1), "b": (10, 2), "c": (10, 3)}, 15, {"a"}, ["b", "c"]),  # kept one skipped
    ({"a": (10, 1), "b": (10, 2)}, 0, {"a", "b"}, []),  # all kept: nothing goes, even over
    ({"a": (100, 1), "b": (1, 2), "c": (1, 3)}, 50, {"a"}, ["b", "c"]),  # cannot fit: drop all
    ({"big": (90, 5), "s1": (5, 1), "s2": (5, 2)}, 50, set(), ["s1", "s2", "big"]),
    ({"big": (90, 1), "s1": (5, 2), "s2": (5, 3)}, 50, set(), ["big"]),
    ({"a": (0, 1), "b": (10, 2)}, 5, set(), ["a", "b"]),  # LRU order, even a zero-size one
])
def test_over_budget(items: dict[str, tuple[int, float]], limit: int, keep: set[str],
                     drop: list[str]) -> None:
    used = [Used(n, size, t) for n, (size, t) in items.items()]
    got = over_budget(used, limit, keep)
    assert got == drop
    assert not set(got) & keep
    assert len(set(got)) == len(got)


# --- the base cache against live mounts -------------------------------------------------------


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("STICKYCI_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STICKYCI_BASE_CACHE_SIZE", raising=False)
    yield tmp_path
    _unmount_under(tmp_path)


def _unmount_under(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(str(root))), reverse=True):
        os.system(f"umount -l '{p}'")


def _disk(key: str, ws: Path, files: dict[str, bytes]) -> Digest:
    disks.mount(key, ws, strategy="copy")
    for name, data in files.items():
        (ws / name).write_bytes(data)
    r = disks.commit(ws)
    assert r.committed
    return Digest.parse(r.snapshot)


def _age(snapshot: Digest | None, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(f"{basecache.base_path(snapshot)}.json", (t, t))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_evict_never_drops_the_base_of_a_live_mount(cache_env: Path, strategy: str) -> None:
    ws = cache_env / "ws"
    snap_a = _disk("a", ws, {"a.bin": os.urandom(200_000)})
    snap_b = _disk("b", ws, {"b.bin": os.urandom(300_000)})
    assert basecache.base_path(snap_a).is_dir() and basecache.base_path(snap_b).is_dir()

    live = cache_env / "live"
    disks.mount("a", live, strategy=strategy)
    # make the live base the least recently used one, so LRU alone would drop it first
    _age(snap_a, 3000)
    _age(snap_b, 2000)
    _age(None, 1000)
    sizes = {u.name: u.size for u in basecache.entries()}
    assert sizes[snap_a.hex] == 200_000 and sizes[snap_b.hex] == 300_000

    dropped = basecache.trim(budget=0)
    assert snap_a.hex not in dropped
    assert snap_b.hex in dropped and basecache.EMPTY in dropped
    assert basecache.base_path(snap_a).is_dir()
    assert not basecache.base_path(snap_b).exists()
    assert not Path(f"{basecache.base_path(snap_b)}.json").exists()
    assert {u.name for u in basecache.entries()} == {snap_a.hex}
    assert not [p for p in basecache.bases_root().iterdir() if p.name.startswith(".gone-")]

    # the live mount still reads its base, and commits on top of it
    data_a = (basecache.base_path(snap_a) / "a.bin").read_bytes()
    assert (live / "a.bin").read_bytes() == data_a
    (live / "more").write_text("more")
    committed = disks.commit(live)
    assert committed.committed
    names = {u.name for u in basecache.entries()}
    # overlay: the live mount's base became the new snapshot's (adopted); copy: both stay
    assert committed.snapshot in names and (strategy == "overlay") != (snap_a.hex in names)
    assert set(basecache.trim(budget=0)) == names  # nothing is live any more: all go
    assert not basecache.base_path(snap_a).exists() and basecache.entries() == []

    disks.mount("a", live, strategy=strategy)  # rebuilt from the store
    assert (live / "a.bin").read_bytes() == data_a and (live / "more").read_text() == "more"
    disks.unmount(live)


def test_evict_respects_the_configured_budget(cache_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ws = cache_env / "ws"
    snaps = [_disk(f"d{i}", ws, {"f": os.urandom(100_000 + i)}) for i in range(3)]
    for i, s in enumerate(snaps):
        _age(s, 1000 - i)  # d0 oldest
    _age(None, 5000)
    monkeypatch.setenv("STICKYCI_BASE_CACHE_SIZE", "250k")  # 256000 bytes: two bases fit
    assert basecache.trim() == [basecache.EMPTY, snaps[0].hex]
    assert [basecache.base_path(s).is_dir() for s in snaps] == [False, True, True]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_evict_racing_a_mount_in_progress_keeps_its_base(
        cache_env: Path, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    """Between finding its cached base and saving its record, a mount is not yet in
    ``all_mounts``; an evict by another process in that window must still leave the base."""
    ws = cache_env / "ws"
    _disk("a", ws, {"f": b"hello"})
    real = api.strategies.mount
    evicted: list[list[str]] = []

    def racing(*args: object, **kw: object) -> str:
        # what another process's `disk mount` does after materialising its own base
        evicted.append(basecache.trim(budget=0))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(api.strategies, "mount", racing)
    disks.mount("a", ws, strategy=strategy)
    assert len(evicted) == 1  # the window was really hit
    assert (ws / "f").read_bytes() == b"hello"
    disks.unmount(ws)


def test_evict_sweeps_a_base_abandoned_mid_restore(env: Env) -> None:
    # What a kill -9 during materialisation leaves: a temp tree whose snapshot lock is free.
    root = env.cache / "bases"
    abandoned = root / f".tmp-{'ab' * 32}-dead"
    (abandoned / "half").mkdir(parents=True)
    busy = root / f".tmp-{'cd' * 32}-alive"
    busy.mkdir()
    with open(root / f".{'cd' * 32}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        basecache.trim()
    assert not abandoned.exists()
    assert busy.exists()


def test_trash_whose_rm_died_is_swept_and_trash_being_deleted_is_left(env: Env) -> None:
    # What a reboot in the middle of a background delete leaves: trash nobody deletes. A tree
    # moved to the trash keeps its old mtime (a base's root has its snapshot's).
    old = time.time() - basecache.TRASH_AGE - 60
    trash = [env.cache / "bases" / ".gone-x", env.cache / "mounts" / ".trash" / "x"]
    for t in trash:
        (t / "deep" / "er").mkdir(parents=True)
        (t / "deep" / "er" / "f").write_bytes(b"x")
        os.utime(t, (old, old))
    basecache.trim()
    assert all(t.exists() for t in trash)  # just moved there: its rm is still at work
    # An hour on, untouched (a clock moved forward: an hour cannot be waited for here).
    basecache.sweep_trash(time.time() + basecache.TRASH_AGE + 60)
    assert not any(t.exists() for t in trash)
