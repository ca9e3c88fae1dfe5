"""Lazy cold mounts: a skeleton at once, content filled on first read by fanotify pre-content
events, never a hole shown to a reader (a bad chunk, a stalled store, a killed filler)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Env, MiB, elsewhere, one_line_error, read_tree, tmpfs, wait_for

from stickyci import fanotify
from stickyci.digest import Digest
from stickyci.snapshot import Entry, load_manifest
from stickyci.store import ObjectStore, open_backend

pytestmark = pytest.mark.root

KEY = "lz"
TRUE = shutil.which("true") or "/bin/true"


def _files() -> dict[str, bytes]:
    return {
        "small.txt": b"hello lazy\n",
        "big.bin": os.urandom(3 * MiB + 123),  # several chunks
        "dir/sub/data.bin": os.urandom(200_000),
        "dir/empty": b"",
        "bin/tool": Path(TRUE).read_bytes(),
    }


@pytest.fixture
def seeded(env: Env) -> Iterator[tuple[Env, dict[str, bytes]]]:
    """Disk ``lz`` committed from ``env``; yields a fresh machine's env (prefetch off unless a
    test turns it on) and the files. Fillers left running are stopped afterwards."""
    files = _files()
    ws = env.root / "seed"
    env.run("disk", "mount", KEY, str(ws), "--strategy", "copy")
    for rel, data in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    (ws / "bin/tool").chmod(0o755)
    (ws / "dir/empty").chmod(0o664)  # a bit the usual umask takes
    os.link(ws / "big.bin", ws / "big.link")
    os.symlink("dir/sub/data.bin", ws / "data.sym")
    env.run("disk", "commit", str(ws))
    cold = elsewhere(env, "cold")
    cold.environ["STICKYCI_LAZY_PREFETCH"] = "0"
    try:
        yield cold, files
    finally:
        for pid in _guardians(cold):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # the guardian and its worker


@pytest.fixture
def lazy(seeded: tuple[Env, dict[str, bytes]]) -> tuple[Env, dict[str, bytes]]:
    """``seeded``, where this machine has fanotify pre-content events (else the test skips)."""
    cold, _ = seeded
    cold.cache.mkdir(parents=True, exist_ok=True)
    try:
        group = fanotify.init()
    except OSError as exc:
        pytest.skip(f"no fanotify pre-content groups here: {exc.strerror}")
    fd = os.open(cold.cache / "probe", os.O_RDWR | os.O_CREAT)
    try:
        fanotify.mark(group, fd)
    except OSError as exc:
        pytest.skip(f"no fanotify pre-content events here (Linux 6.14+): {exc.strerror}")
    finally:
        os.close(fd)
        os.close(group)
        os.unlink(cold.cache / "probe")
    return seeded


def _state_dirs(e: Env) -> list[Path]:
    root = e.cache / "mounts"
    return [d for d in root.iterdir() if not d.name.startswith(".")] if root.is_dir() else []


def _guardians(e: Env) -> list[int]:
    pids = []
    for d in _state_dirs(e):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((d / "filler.pid").read_text().split()[0]))
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker(guardian: int) -> int:
    children = Path(f"/proc/{guardian}/task/{guardian}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _status(e: Env) -> dict[str, Any]:
    (d,) = _state_dirs(e)
    try:
        doc: dict[str, Any] = json.loads((d / "filler.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _lazy_dir(e: Env) -> Path:
    (d,) = (e.cache / "bases").glob(".lazy-*")
    return d


def _cat(path: Path) -> subprocess.CompletedProcess[bytes]:
    # A reader in its own process, so a filler that never answers fails the test by timeout.
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=60)


def _latest_entry(e: Env, path: str) -> tuple[ObjectStore, Entry]:
    """The store, and ``path``'s entry in the disk's latest snapshot (to find its chunks)."""
    objects = ObjectStore(open_backend(f"file://{e.store}"))
    snapshot = e.json("disk", "show", KEY)["generations"][-1]["snapshot"]
    return objects, load_manifest(objects, Digest.parse(snapshot)).entries[path]


def _mount(e: Env, ws: Path, strategy: str = "lazy") -> dict[str, Any]:
    r: dict[str, Any] = e.json("disk", "mount", KEY, str(ws), "--strategy", strategy)
    return r


def test_cold_mount_is_a_skeleton_filled_on_first_read(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    ws = cold.root / "ws"
    r = _mount(cold, ws)
    assert (r["strategy"], r["base_cached"]) == ("lazy", False)
    skeleton = _lazy_dir(cold)
    # Nothing fetched yet: the placeholders have their size and no data blocks.
    for rel, data in files.items():
        st = os.lstat(skeleton / rel)
        assert (st.st_size, st.st_blocks) == (len(data), 0), rel
    assert os.readlink(ws / "data.sym") == "dir/sub/data.bin"
    assert os.stat(ws / "big.bin").st_ino == os.stat(ws / "big.link").st_ino
    assert os.stat(ws / "bin/tool").st_mode & 0o777 == 0o755
    assert os.stat(ws / "dir/empty").st_mode & 0o777 == 0o664
    mtime = os.stat(ws / "big.bin").st_mtime_ns

    done = _cat(ws / "small.txt")
    assert (done.returncode, done.stdout) == (0, files["small.txt"])
    assert os.lstat(skeleton / "big.bin").st_blocks == 0  # only what was read was fetched
    with open(ws / "big.link", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == files["big.bin"]
    assert os.stat(ws / "big.bin").st_mtime_ns == mtime  # filling keeps the manifest's mtime
    assert subprocess.run([str(ws / "bin/tool")], timeout=60).returncode == 0
    # Copy-up into the overlay's upper dir reads the lower file: it must be filled first.
    with open(ws / "dir/sub/data.bin", "ab") as out:
        out.write(b"+")
    assert (ws / "data.sym").read_bytes() == files["dir/sub/data.bin"] + b"+"

    wait_for(lambda: _status(cold).get("on_demand_files") == 4, "the status to count 4 fills")
    status = _status(cold)
    assert status["prefetched_files"] == 0, status
    # Filled through the skeleton's own fds, opened before the marks: no event of the filler's.
    assert status["own_events"] == 0, status
    assert status["on_demand_bytes"] == sum(
        len(files[p]) for p in ("small.txt", "big.bin", "bin/tool", "dir/sub/data.bin"))
    assert not status["done"]
    # `disk show` tells what this machine's lazy mount of the disk fetched, and how.
    (shown,) = cold.json("disk", "show", KEY)["lazy_mounts"]
    assert shown == {"path": str(ws.resolve()), **status}
    text = cold.run("disk", "show", KEY).stdout
    assert f"lazy mount at {ws.resolve()}: " in text and "in 4 files fetched on demand" in text
    assert "in 0 files prefetched" in text and "; filling on demand only" in text

    (guardian,) = _guardians(cold)
    c = cold.json("disk", "commit", str(ws))
    assert c["committed"] and c["modified"] == 1, c
    # The commit stopped the filler and dropped the incomplete base.
    wait_for(lambda: not _alive(guardian), "the filler to exit")
    assert not list((cold.cache / "bases").glob(".lazy-*"))

    check = elsewhere(cold, "check")
    check.run("disk", "mount", KEY, str(check.root / "check-ws"), "--strategy", "copy")
    got = read_tree(check.root / "check-ws")
    assert got["dir/sub/data.bin"] == files["dir/sub/data.bin"] + b"+"
    assert got["big.bin"] == got["big.link"] == files["big.bin"]


def test_prefetch_completes_the_base_and_publishes_it(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    cold.environ.pop("STICKYCI_LAZY_PREFETCH")
    ws = cold.root / "ws"
    assert _mount(cold, ws, "lazy")["strategy"] == "lazy"
    # Not _guardians(): on a small tree the filler may be done and gone already.
    (state,) = _state_dirs(cold)
    guardian = int((state / "filler.pid").read_text().split()[0])
    wait_for(lambda: _status(cold).get("done", False), "the prefetch to finish")
    status = _status(cold)
    distinct = sum(len(d) for d in files.values())
    assert status["prefetched_bytes"] + status["on_demand_bytes"] == distinct == status["bytes"]
    wait_for(lambda: not _alive(guardian), "the filler to exit once the base is complete")
    (shown,) = cold.json("disk", "show", KEY)["lazy_mounts"]
    assert shown["done"] and shown["prefetched_files"] + shown["on_demand_files"] == 4, shown
    assert cold.run("disk", "show", KEY).stdout.rstrip().endswith("; complete")
    snapshot = cold.json("disk", "show", KEY)["generations"][-1]["snapshot"]
    base = cold.cache / "bases" / snapshot
    assert read_tree(base) == {**files, "big.link": files["big.bin"],
                               "data.sym": files["dir/sub/data.bin"]}
    assert read_tree(ws) == read_tree(base)
    cold.run("disk", "unmount", str(ws))
    assert cold.json("disk", "show", KEY)["lazy_mounts"] == []
    assert base.is_dir()  # a published base stays cached
    again = _mount(cold, ws, "auto")
    assert (again["strategy"], again["base_cached"]) == ("overlay", True)


def test_a_chunk_that_fails_to_verify_is_an_io_error_naming_it(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    objects, entry = _latest_entry(cold, "big.bin")
    chunk = Digest(bytes.fromhex(entry.chunks[1][0]))
    loc = objects.locate(chunk)
    assert loc is not None
    with open(cold.store / loc.pack, "r+b") as f:
        f.seek(loc.offset + loc.length - 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    ws = cold.root / "ws"
    _mount(cold, ws)
    bad = _cat(ws / "big.bin")
    assert bad.returncode != 0 and b"Input/output error" in bad.stderr
    # Never zeros: the reader got no bytes at all, and the file is still not filled.
    assert len(bad.stdout) == 0
    (d,) = _state_dirs(cold)
    assert chunk.hex in (d / "filler.log").read_text()
    assert _cat(ws / "small.txt").stdout == files["small.txt"]
    wait_for(lambda: _status(cold).get("errors", 0) >= 1, "the failure to be counted")


def test_a_store_that_cannot_serve_is_an_io_error_then_a_retry_fills(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    ws = cold.root / "ws"
    _mount(cold, ws)
    objects, entry = _latest_entry(cold, "dir/sub/data.bin")
    chunk = Digest(bytes.fromhex(entry.chunks[0][0]))
    loc = objects.locate(chunk)
    assert loc is not None
    pack = cold.store / loc.pack
    away = pack.with_name(pack.name + ".away")
    os.rename(pack, away)  # the pack is gone from the store
    bad = _cat(ws / "data.sym")
    assert bad.returncode != 0 and b"Input/output error" in bad.stderr and bad.stdout == b""
    (d,) = _state_dirs(cold)
    assert str(chunk) in (d / "filler.log").read_text()
    os.rename(away, pack)  # back: the file was left unfilled, so the next read fills it
    good = _cat(ws / "dir/sub/data.bin")
    assert (good.returncode, good.stdout == files["dir/sub/data.bin"]) == (0, True)


def _blocked_on_fifo(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            if "fifo" in Path(f"/proc/{pid}/task/{tid}/wchan").read_text() or \
                    "wait_for_partner" in Path(f"/proc/{pid}/task/{tid}/wchan").read_text():
                return True
    return False


def test_a_filler_killed_mid_fill_is_replaced_and_no_reader_sees_holes(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    ws = cold.root / "ws"
    _mount(cold, ws)
    objects, entry = _latest_entry(cold, "big.bin")
    loc = objects.locate(Digest(bytes.fromhex(entry.chunks[0][0])))
    assert loc is not None
    # A store that stalls: the pack is a FIFO nobody writes, so the fill blocks opening it.
    pack = cold.store / loc.pack
    kept = pack.with_name(pack.name + ".kept")
    os.rename(pack, kept)
    os.mkfifo(pack)
    (guardian,) = _guardians(cold)
    worker = _worker(guardian)
    reader = subprocess.Popen(["cat", str(ws / "big.bin")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _blocked_on_fifo(worker), "the filler to block on the stalled store")
        os.replace(kept, pack)
        os.kill(worker, signal.SIGKILL)
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
    # The read the dead worker had taken is refused, not allowed onto the holes.
    assert reader.returncode != 0 and b"Input/output error" in err
    assert out == b""
    assert _guardians(cold) == [guardian] and _worker(guardian) != worker
    again = _cat(ws / "big.bin")
    assert (again.returncode, again.stdout == files["big.bin"]) == (0, True)
    assert _status(cold)["restarts"] == 1
    # The new worker has none of the skeleton's fds: it opened the file itself, and allowed
    # the events of that open and of its writes.
    wait_for(lambda: _status(cold).get("own_events", 0) >= 2, "the filler's own events")


def test_either_holder_of_the_group_may_be_killed(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = lazy
    ws = cold.root / "ws"
    _mount(cold, ws)
    (first,) = _guardians(cold)
    worker = _worker(first)
    os.kill(first, signal.SIGKILL)
    # The worker, left alone with the group, forks a new guardian at once.
    wait_for(lambda: _guardians(cold) not in ([], [first]), "a new guardian")
    (second,) = _guardians(cold)
    assert Path(f"/proc/{second}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(worker)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not _alive(worker), "the worker to die")
    # The new guardian kept the group and started a new worker, which fills as before.
    done = _cat(ws / "big.bin")
    assert (done.returncode, done.stdout == files["big.bin"]) == (0, True)
    assert _guardians(cold) == [second] and _worker(second) != worker
    wait_for(lambda: _status(cold).get("restarts") == 1, "the restart to be counted")


def test_a_commit_refuses_once_the_filler_is_gone(
        lazy: tuple[Env, dict[str, bytes]]) -> None:
    cold, _ = lazy
    ws = cold.root / "ws"
    _mount(cold, ws)
    (guardian,) = _guardians(cold)
    worker = _worker(guardian)
    os.killpg(os.getpgid(guardian), signal.SIGKILL)  # both at once: neither can replace the other
    wait_for(lambda: not _alive(guardian) and not _alive(worker), "the filler to die")
    proc = cold.run("disk", "commit", str(ws), check=False)
    assert proc.returncode != 0
    assert "lazy filler" in one_line_error(proc)
    cold.run("disk", "unmount", str(ws))
    assert not list((cold.cache / "bases").glob(".lazy-*"))
    assert not any(ws.iterdir())


def test_without_pre_content_events_the_mount_restores_eagerly(
        seeded: tuple[Env, dict[str, bytes]]) -> None:
    cold, files = seeded
    # tmpfs has no pre-content events: the base cache there cannot be lazy.
    with tmpfs(cold.cache, "64m"):
        ws = cold.root / "ws"
        proc = cold.run("disk", "mount", KEY, str(ws), "--strategy", "lazy")
        notice = [line for line in proc.stderr.splitlines() if "lazy" in line]
        assert len(notice) == 1 and "restoring the whole base" in notice[0], proc.stderr
        assert (ws / "big.bin").read_bytes() == files["big.bin"]
        assert stat.S_ISREG(os.lstat(ws / "small.txt").st_mode)
        assert not _guardians(cold)
        cold.run("disk", "unmount", str(ws))
