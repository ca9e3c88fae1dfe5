"""What test modules share besides fixtures: the CLI environment, strategies, polling, checks.

Fixtures live in ``conftest.py`` (and the S3 server's in ``seaweed.py``, a plugin it declares);
``server.py`` starts and talks to ``stickyci serve``. Test modules import plain helpers from
these modules, never from ``conftest`` or from each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stickyci.digest import Digest
from stickyci.snapshot import Content, load_manifest
from stickyci.store import LocalBackend, ObjectStore, decode_index

IS_ROOT = os.geteuid() == 0
MiB = 1 << 20

# The mount strategies every machine can test: overlay needs root, so it carries the ``root``
# marker that conftest skips on; reflink needs an xfs image and has tests of its own.
STRATEGIES = ["copy", pytest.param("overlay", marks=pytest.mark.root)]

WAIT_TIMEOUT = 30.0

EXAMPLE_DIR = Path(__file__).parent.parent / "examples" / "monorepo"
DEPS_FILES = 6
"""The example's dependency layer in the tests (``--set deps_files``): a quarter of the default,
the same story in a quarter of the compile time."""


def deps_objects(files: int) -> int:
    """How many objects the example's dependency layer has with ``files`` kernels per library."""
    spec = importlib.util.spec_from_file_location("gen_deps", EXAMPLE_DIR / "gen_deps.py")
    assert spec and spec.loader
    gen_deps = sys.modules.setdefault("gen_deps", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(gen_deps)  # registered first: its dataclasses look themselves up
    return sum(p.suffix == ".c" for p in gen_deps.wanted_files(files))


class TimedOut(AssertionError):
    """``wait_for``'s condition did not hold in time (a test failure, unless caught)."""


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT,
             interval: float = 0.01) -> None:
    """Poll ``cond`` every ``interval`` seconds until it holds; fail naming ``what`` after
    ``timeout`` seconds.

    Exceptions from ``cond`` propagate at once, so a condition can give up early (a process
    that died, say) by raising.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline, not synchronising by sleep


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


def unmount_under(root: Path) -> None:
    """Lazily unmount everything mounted below ``root``, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", p], check=False)


def tmpfs(path: Path, size: str) -> contextlib.AbstractContextManager[Path]:
    """Mount a tmpfs of ``size`` (as ``mount -o size=`` takes it) on ``path``; skip the test
    where that is not possible (not root, say)."""
    return scratch_mount(path, "tmpfs", f"size={size}")


@contextlib.contextmanager
def scratch_mount(path: Path, fstype: str, options: str = "defaults") -> Iterator[Path]:
    """Mount a fresh filesystem of ``fstype`` (tmpfs, ramfs) on ``path`` for the block; skip
    the test where that is not possible (not root, say)."""
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def elsewhere(env: Env, name: str) -> Env:
    """The same store seen from another machine: an empty cache, so mounts read the store."""
    cache = env.root / name
    return Env(env.root, env.store, cache, {**env.environ, "STICKYCI_CACHE_DIR": str(cache)})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``stickyci: error: …`` line a failed command printed, and nothing else."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stickyci: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def is_mount_record(env: Env, path: Path) -> bool:
    """Whether stickyci has a mount record for ``path`` (probed with a harmless unmount)."""
    made = not path.exists()
    if made:
        path.mkdir()  # a record can outlive its directory; the probe needs one
    try:
        proc = env.run("disk", "unmount", str(path), check=False)
    finally:
        if made:
            path.rmdir()
    return "is not a stickyci mount" not in proc.stderr


def commit_tree(e: Env, key: str, files: dict[str, bytes], ws: str = "ws") -> dict[str, Any]:
    """Mount ``key``, write ``files`` into it, commit; the commit's JSON."""
    path = e.root / ws
    e.run("disk", "mount", key, str(path), "--strategy", "copy")
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    result: dict[str, Any] = e.json("disk", "commit", str(path))
    return result


def start_commit(env: Env, ws: Path) -> subprocess.Popen[str]:
    """``disk commit`` in a session of its own, so its whole process group can be killed."""
    return subprocess.Popen([sys.executable, "-m", "stickyci", "disk", "commit", str(ws)],
                            env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def reap(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Kill what is left of ``start_commit``'s process group; its output."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the committer, if any
    return proc.communicate(timeout=60)


def write_big(ws: Path, mib: int) -> None:
    """``mib`` MiB of incompressible files under ``ws/big``: a commit of many packs."""
    (ws / "big").mkdir()
    for i in range(mib // 4):
        (ws / "big" / f"{i:03}.bin").write_bytes(os.urandom(4 * MiB))


def names(root: Path, namespace: str) -> set[str]:
    """The object names in one namespace (``packs``, ``tmp``…) of a ``file://`` store."""
    d = root / namespace
    return {e.name for e in d.iterdir() if not e.name.startswith(".")} if d.is_dir() else set()


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


def tree_digest(root: Path) -> dict[str, str]:
    """Every directory and file under ``root`` by relative path: ``dir`` or the file's hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.blake2b(f.read()).hexdigest()
    return out


def described(store: ObjectStore, snapshot: Digest) -> dict[str, tuple[object, ...]]:
    """The tree a snapshot describes, each file's content as its bytes rather than chunk
    references: two snapshots of one tree whose small files were bundled otherwise (a full
    commit and an incremental one) describe it alike."""
    m = load_manifest(store, snapshot)
    content = Content(store, whole_pack=False)
    return {e.path: (e.kind, e.mode, e.mtime_ns, e.uid, e.gid, e.size, e.target, e.link,
                     b"".join(content.read(ref, e.path) for ref in e.chunks))
            for e in m.entries.values()}


def stored_objects(store_dir: Path) -> Iterator[bytes]:
    """Every object in the ``file://`` store at ``store_dir``, read and verified."""
    store = ObjectStore(LocalBackend(store_dir))
    for index in sorted((store_dir / "index").iterdir()):
        for e in decode_index(index.name, index.read_bytes()):
            yield store.get(e.digest)
