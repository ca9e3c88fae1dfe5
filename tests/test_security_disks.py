"""Attacks on disks by a hostile writer (a fork's token may write ``pr-*`` refs and packs), and
the faults that must leave a mount all or nothing and a commit truthful.

Every attack is performed for real: refs and packs are written into a real store, the CLI runs
as a real process, mounts are real overlays, holders are real processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import STRATEGIES, Env, elsewhere, is_mount_record, one_line_error, wait_for
from server import start_server

from stickyci import codec
from stickyci.digest import Digest
from stickyci.disks import refs
from stickyci.disks.refs import DiskRef
from stickyci.errors import IntegrityError, InvalidKey, UsageError
from stickyci.store.backend import check_name
from stickyci.store.objects import decode_index, encode_index

HEX = "ab" * 32


def _gen(gen: int = 1, **over: Any) -> dict[str, Any]:
    return {"gen": gen, "snapshot": HEX, "committed_at": 1.5, "size": 10, "files": 1,
            "stored_bytes": 10, "committer": "host:1", **over}


def _ref(key: str = "k", **over: Any) -> dict[str, Any]:
    return {"key": key, "created": 1.0, "last_used": 2.0, "generations": [_gen()], **over}


def _raw(env: Env, key: str, data: bytes) -> None:
    """What a writer holding a token for ``key`` can store as its ref."""
    (env.store / "refs").mkdir(parents=True, exist_ok=True)
    (env.store / "refs" / key).write_bytes(data)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _outside(env: Env) -> set[str]:
    """Every path under the test's root but outside its store and cache dir."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(env.root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in (env.store, env.cache)]
        out |= {os.path.join(dirpath, n) for n in dirnames + filenames}
    return out


# --- refs are parsed into typed values at the boundary -----------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("empty-object", b"{}"),
    ("list", b"[]"),
    ("not-json", b"\xff\x00garbage"),
    ("path-snapshot", json.dumps(_ref(generations=[_gen(snapshot="./../../secret")])).encode()),
    ("prefixed-snapshot", json.dumps(_ref(generations=[_gen(snapshot="blake3:" + HEX)])).encode()),
    ("newline-snapshot", json.dumps(_ref(generations=[_gen(snapshot=HEX + "\n")])).encode()),
    ("bool-gen", json.dumps(_ref(generations=[_gen(gen=True)])).encode()),
    ("float-size", json.dumps(_ref(generations=[_gen(size=1.5)])).encode()),
    ("negative-files", json.dumps(_ref(generations=[_gen(files=-1)])).encode()),
    ("string-time", json.dumps(_ref(created="yesterday")).encode()),
    ("nan-time", json.dumps(_ref(last_used=math.nan)).encode()),
    ("inf-time", json.dumps(_ref(generations=[_gen(committed_at=math.inf)])).encode()),
    ("unknown-field", json.dumps(_ref(owner="me")).encode()),
    ("unknown-gen-field", json.dumps(_ref(generations=[_gen(path="/etc")])).encode()),
    ("missing-field", json.dumps({"key": "k", "created": 1.0, "last_used": 1.0}).encode()),
    ("other-key", json.dumps(_ref(key="victim")).encode()),
    ("bad-key", json.dumps(_ref(key="k\n")).encode()),
    ("duplicate-field", b'{"key": "k", "key": "k", "created": 1, "last_used": 1, '
                        b'"generations": []}'),
    ("gens-not-increasing", json.dumps(_ref(generations=[_gen(2), _gen(2)])).encode()),
    ("gens-decreasing", json.dumps(_ref(generations=[_gen(3), _gen(1)])).encode()),
    ("committer-escape", json.dumps(_ref(generations=[_gen(committer="x\x1b[2Jy")])).encode()),
    ("generations-object", json.dumps(_ref(generations={"0": _gen()})).encode()),
    ("too-many-gens", json.dumps(_ref(generations=[_gen(i) for i in range(1, 200)])).encode()),
    ("path-pack-hint", json.dumps(_ref(generations=[_gen(packs=["../../etc/passwd"])])).encode()),
    ("pack-hint-not-list", json.dumps(_ref(generations=[_gen(packs=HEX)])).encode()),
    ("too-many-pack-hints", json.dumps(_ref(generations=[_gen(packs=[HEX] * 1025)])).encode()),
]


@pytest.mark.parametrize(("case", "data"), MALFORMED, ids=[c for c, _ in MALFORMED])
def test_malformed_ref_is_refused_naming_it(case: str, data: bytes) -> None:
    with pytest.raises(IntegrityError) as got:
        DiskRef.decode(data, "k")
    message = str(got.value)
    assert message.startswith("refs/k is malformed") and "\n" not in message


def test_well_formed_ref_round_trips_with_typed_values() -> None:
    ref = DiskRef.decode(json.dumps(_ref(generations=[_gen(1), _gen(4, committed_at=7)])).encode(),
                         "k")
    assert ref.latest is not None and ref.latest.snapshot == Digest.parse(HEX)
    assert isinstance(ref.latest.committed_at, float)
    assert DiskRef.decode(ref.encode(), "k") == ref
    hinted = DiskRef.decode(json.dumps(_ref(generations=[_gen(packs=[HEX])])).encode(), "k")
    assert hinted.latest is not None and hinted.latest.packs == (Digest.parse(HEX),)


@pytest.mark.parametrize("key", ["abc\n", "abc\r", "\nabc", "a/b", "..", ".x"])
def test_key_and_name_rules_hold_to_the_end_of_the_string(key: str) -> None:
    with pytest.raises(InvalidKey):
        refs.check_key(key)
    with pytest.raises(UsageError):
        check_name(f"refs/{key}")
    with pytest.raises(ValueError):
        Digest.parse(HEX + key)


def test_key_with_trailing_newline_is_refused_by_the_cli(env: Env) -> None:
    ws = env.root / "ws"
    proc = env.run("disk", "mount", "abc\n", str(ws), check=False)
    assert proc.returncode == 2 and "invalid disk key" in one_line_error(proc)
    assert not ws.exists()
    for key in ("a" * 201, ""):
        with pytest.raises(InvalidKey):
            refs.check_key(key)
    assert env.run("disk", "ls").stdout.strip() == "no disks"


# --- a ref whose snapshot is a path ------------------------------------------------------------

@pytest.mark.root
def test_path_like_snapshot_is_never_used_as_a_path(env: Env) -> None:
    # bases/<snapshot> with snapshot "./../../secret" is <root>/secret: a root-only tree
    secret = env.root / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root only\n")
    os.chmod(secret / "key", 0o600)
    doc = _ref("pr-1-evil", generations=[_gen(snapshot="./../../secret")])
    _raw(env, "pr-1-evil", json.dumps(doc).encode())
    env.run("disk", "mount", "pr-1-good", str(env.root / "warm"))  # creates the cache dir
    env.run("disk", "unmount", str(env.root / "warm"))
    before = _outside(env)

    ws = env.root / "ws"
    proc = env.run("disk", "mount", "pr-1-evil", str(ws), "--strategy", "overlay", check=False)
    assert proc.returncode == 4, proc.stderr
    line = one_line_error(proc)
    assert "refs/pr-1-evil is malformed" in line and "snapshot" in line
    assert not ws.exists() and not _mounted(ws)
    assert _outside(env) == before  # no .pin, no base, nothing outside the cache
    assert not is_mount_record(env, ws)

    for args, code in ((["disk", "show", "pr-1-evil"], 4), (["disk", "diff", "pr-1-evil"], 4)):
        proc = env.run(*args, check=False)
        assert proc.returncode == code and "refs/pr-1-evil" in one_line_error(proc)

    # gc goes on without it, naming it
    gc = env.run("disk", "gc", "--grace", "0s", "--json")
    assert "refs/pr-1-evil" in json.loads(gc.stdout)["skipped"]
    assert "refs/pr-1-evil" in gc.stderr and "Traceback" not in gc.stderr

    # a commit onto a disk whose ref turned malformed stops before moving it, in one line
    env.run("disk", "mount", "pr-1-mine", str(ws), "--strategy", "overlay")
    (ws / "f").write_text("work")
    _raw(env, "pr-1-mine", json.dumps(_ref("pr-1-mine", generations=[
        _gen(snapshot="../../../etc")])).encode())
    proc = env.run("disk", "commit", str(ws), check=False)
    assert proc.returncode == 4 and "refs/pr-1-mine is malformed" in one_line_error(proc)
    assert _mounted(ws) and (ws / "f").read_text() == "work"  # the work is kept
    env.run("disk", "rm", "pr-1-mine")  # rm works on a malformed ref
    assert env.json("disk", "commit", str(ws))["generation"] == 1
    assert _outside(env) - before == {str(ws)}  # left empty by the commit
    assert (secret / "key").read_text() == "root only\n"


# --- one bad ref never breaks the others' listing ----------------------------------------------

def _two_good_disks(env: Env) -> dict[str, bytes]:
    data = {"a": os.urandom(300_000), "b": os.urandom(200_000)}
    for key, content in data.items():
        ws = env.root / f"ws-{key}"
        env.run("disk", "mount", key, str(ws), "--strategy", "copy")
        (ws / "f.bin").write_bytes(content)
        env.run("disk", "commit", str(ws))
    return data


def test_malformed_refs_among_good_ones(env: Env) -> None:
    data = _two_good_disks(env)
    bad = {f"pr-{i}-{case}": blob for i, (case, blob) in enumerate(MALFORMED)}
    for key, blob in bad.items():
        _raw(env, key, blob)
    (env.store / "refs" / "pr-x\n").write_bytes(b"{}")  # a name no key can have

    ls = env.run("disk", "ls", "--json")
    assert [d["key"] for d in json.loads(ls.stdout)] == ["a", "b"]
    for key in bad:
        assert f"refs/{key} is malformed" in ls.stderr
    assert "'pr-x\\n'" in ls.stderr and "Traceback" not in ls.stderr
    text = env.run("disk", "ls")
    assert [line.split()[0] for line in text.stdout.splitlines()[1:]] == ["a", "b"]

    evicted = env.json("disk", "evict", "--unused-for", "1d")
    assert evicted["evicted"] == [] and evicted["kept"] == 2
    assert set(evicted["skipped"]) == {f"refs/{k}" for k in bad} | {"refs/pr-x\n"}

    # gc with the bad refs present: nothing of a live disk goes
    report = env.json("disk", "gc", "--grace", "0s")
    assert set(report["skipped"]) == {f"refs/{k}" for k in bad} | {"refs/pr-x\n"}
    _check_disks(env, data)

    gone = env.json("disk", "evict", "--unused-for", "0s")  # the good ones go, the bad stay
    assert sorted(gone["evicted"]) == ["a", "b"] and len(gone["skipped"]) == len(bad) + 1
    assert (env.store / "refs" / next(iter(bad))).exists()


def _check_disks(env: Env, data: dict[str, bytes]) -> None:
    """Each disk restores bit for bit on a machine with an empty cache."""
    there = elsewhere(env, "cache2")
    for key, content in data.items():
        ws = env.root / f"check-{key}"
        there.run("disk", "mount", key, str(ws), "--strategy", "copy")
        assert (ws / "f.bin").read_bytes() == content
        there.run("disk", "unmount", str(ws))


def test_malformed_ref_does_not_break_the_server_listing(env: Env) -> None:
    _two_good_disks(env)
    _raw(env, "pr-1-x", b"{}")
    with start_server(env.root / "srv", store_url=f"file://{env.store}") as srv:
        for token, sees in ((srv.admin, ["a", "b"]), (srv.token("--read", "*"), ["a", "b"]),
                            (srv.token("--read", "a"), ["a"])):
            with srv.client(token) as c:
                got = c.get("/v1/disks")
            assert got.status_code == 200, got.text
            assert [d["key"] for d in got.json()["disks"]] == sees


# --- gc does not trust an index ----------------------------------------------------------------

def _entries(env: Env) -> list[tuple[Digest, int, int]]:
    out = []
    for p in (env.store / "index").iterdir():
        out += decode_index(f"index/{p.name}", p.read_bytes())
    return out


@pytest.mark.parametrize("lie", ["pack-missing", "outside-pack", "wrong-bytes"])
def test_gc_keeps_data_a_lying_index_claims(env: Env, lie: str) -> None:
    data = _two_good_disks(env)
    claims = [(d, 0, ln) for d, _, ln in _entries(env)]
    pack = os.urandom(max(ln for _, _, ln in claims) + 16) if lie == "wrong-bytes" else b"x" * 8
    pid = Digest.of(pack).hex
    if lie != "pack-missing":
        (env.store / "packs" / pid).write_bytes(pack)
    (env.store / "index" / pid).write_bytes(encode_index(claims))
    # older than every real pack, so its claims come first
    for name in (f"packs/{pid}", f"index/{pid}"):
        with contextlib.suppress(FileNotFoundError):
            os.utime(env.store / name, (1, 1))

    report = env.json("disk", "gc", "--grace", "0s")
    assert report["packs_deleted"] == 0
    if lie != "wrong-bytes":  # an index that claims nothing is garbage
        assert report["bad_indexes"] == 1 and not (env.store / "index" / pid).exists()
        assert not (env.store / "packs" / pid).exists()
    else:
        # It looks like an index, so it stays; a reader could take its claims first (the
        # server refuses such an index on upload), so it goes before the data is checked.
        (env.store / "index" / pid).unlink()
    _check_disks(env, data)


def test_gc_keeps_the_pack_of_a_damaged_index(env: Env) -> None:
    _two_good_disks(env)
    victim = sorted((env.store / "index").iterdir())[0]
    damaged = bytearray(victim.read_bytes())
    damaged[10] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(damaged))
    before = {p.name for p in (env.store / "packs").iterdir()}
    # the disk whose manifest that index listed cannot be marked: gc stops, deleting nothing
    proc = env.run("disk", "gc", "--grace", "0s", "--json", check=False)
    assert proc.returncode == 8 and json.loads(proc.stdout)["kind"] == "BackendError"
    assert f"index/{victim.name} is corrupt" in proc.stderr
    assert "gc stopped before deleting anything" in proc.stderr
    assert victim.exists() and {p.name for p in (env.store / "packs").iterdir()} == before


def test_verified_claim_still_dedups(env: Env) -> None:
    """The verification refuses only false claims: a true older copy still wins."""
    data = _two_good_disks(env)
    real = sorted((env.store / "index").iterdir())[0].name
    body = (env.store / "packs" / real).read_bytes()
    listing = decode_index(f"index/{real}", (env.store / "index" / real).read_bytes())
    pad = codec.encode(b"pad")  # a copy of the pack under another name, older
    copy = Digest.of(body + pad).hex
    (env.store / "packs" / copy).write_bytes(body + pad)
    (env.store / "index" / copy).write_bytes(
        encode_index([*listing, (Digest.of(b"pad"), len(body), len(pad))]))
    for ns in ("packs", "index"):
        os.utime(env.store / ns / copy, (1, 1))

    report = env.json("disk", "gc", "--grace", "0s")
    assert report["packs_deleted"] == 1 and report["bad_indexes"] == 0
    assert not (env.store / "packs" / real).exists() and (env.store / "packs" / copy).exists()
    _check_disks(env, data)


# --- a mount is all or nothing -----------------------------------------------------------------

def _fill(fs: Path) -> Path:
    """Fill the filesystem at ``fs`` to the last block; return the filler to delete later."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.root
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_store_full_during_mount_leaves_nothing_mounted(small_store: Env, strategy: str) -> None:
    env = small_store
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    (ws / "f").write_text("kept")
    env.run("disk", "commit", str(ws))
    ws.rmdir()
    filler = _fill(env.store)

    # the mount itself works (the base comes from the cache dir); recording its use does not
    proc = env.run("disk", "mount", "k", str(ws), "--strategy", strategy, "--json", check=False)
    assert proc.returncode == 7, proc.stderr
    assert "full" in one_line_error(proc)
    assert json.loads(proc.stdout) == {"error": one_line_error(proc)[len("stickyci: error: "):],
                                       "kind": "StorageFull", "exit_code": 7}
    assert not ws.exists() and not _mounted(ws)
    assert not is_mount_record(env, ws)
    assert not any((env.cache / "mounts").glob("*/state.json"))

    filler.unlink()
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)  # the retry works
    assert (ws / "f").read_text() == "kept"
    env.run("disk", "unmount", str(ws))


@pytest.mark.root
def test_bad_base_cache_size_is_refused_before_mounting(env: Env) -> None:
    ws = env.root / "ws"
    bad = {**env.environ, "STICKYCI_BASE_CACHE_SIZE": "abc"}
    proc = subprocess.run([sys.executable, "-m", "stickyci", "disk", "mount", "k", str(ws),
                           "--strategy", "overlay"], env=bad, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "STICKYCI_BASE_CACHE_SIZE" in one_line_error(proc)
    assert not ws.exists() and not _mounted(ws)
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    assert _mounted(ws)
    env.run("disk", "unmount", str(ws))


# --- a commit that succeeded says so -----------------------------------------------------------

def _waits_for_flock(pid: int) -> bool:
    """Whether process ``pid`` is blocked waiting for a flock (a ``->`` line of /proc/locks)."""
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[5] == str(pid) for line in f)


@contextlib.contextmanager
def _holding(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.root
def test_commit_busy_after_the_ref_moved_reports_the_new_generation(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    env.run("disk", "commit", str(ws))
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    (ws / "f").write_text("committed")
    holder: subprocess.Popen[bytes] | None = None
    # The commit passes its busy check (nobody is in the mount), then waits for the local
    # index's lock; the holder enters the mount while it waits, so that the commit cannot
    # unmount the overlay before it reads it (_seal), nor after the ref has moved.
    [index_lock] = (env.cache / "index").glob("*.lock")
    with _holding(index_lock):
        commit = subprocess.Popen([sys.executable, "-m", "stickyci", "disk", "commit", str(ws),
                                   "--json"], env=env.environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: commit.poll() is not None or _waits_for_flock(commit.pid),
                     "the commit to wait for the local index's lock", interval=0.002)
            assert commit.poll() is None, commit.communicate()
            holder = subprocess.Popen(["sleep", "infinity"], cwd=ws)
        except BaseException:
            commit.kill()
            raise
    try:
        out, err = commit.communicate(timeout=120)
        assert commit.returncode == 0, err
        got = json.loads(out)
        assert got["committed"] and got["generation"] == 2 and got["still_mounted"]
        assert f"pid {holder.pid} (sleep infinity)" in got["warning"]
        assert "generation 2" in got["warning"] and "Traceback" not in err
        assert "still mounted" in err
        assert env.json("disk", "show", "k")["generations"][-1]["gen"] == 2
        assert _mounted(ws)
    finally:
        holder.kill()
        holder.wait()
    env.run("disk", "unmount", str(ws))
    assert not _mounted(ws)
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    assert (ws / "f").read_text() == "committed"
    env.run("disk", "unmount", str(ws))


def test_json_failure_prints_an_error_body(env: Env) -> None:
    proc = env.run("disk", "show", "nope", "--json", check=False)
    assert proc.returncode == 3
    body = json.loads(proc.stdout)
    assert body == {"error": one_line_error(proc)[len("stickyci: error: "):], "kind": "NotFound",
                    "exit_code": 3}
    _raw(env, "pr-1-x", b"{}")
    proc = env.run("disk", "show", "pr-1-x", "--json", check=False)
    assert json.loads(proc.stdout)["kind"] == "IntegrityError" and proc.returncode == 4
