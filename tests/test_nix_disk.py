"""A sticky disk holding a Nix store, with the real ``nix-daemon`` (Debian's Nix 2.8) serving it.

A test cannot mount over the machine's own ``/nix``, so the disk is mounted at ``ROOT/nix`` and
Nix uses ``ROOT`` as a chroot store: the disk holds exactly what ``/nix`` holds (``store/``,
``var/nix/db``, the daemon's socket) and store paths are still ``/nix/store/…``. The daemon
serves that store on the socket inside the disk, as it does under ``/nix``.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import STRATEGIES, Env, elsewhere, is_mount_record, one_line_error, wait_for
from nix_helpers import NIX_DAEMON, NixRoot, stop_daemon

pytestmark = [
    pytest.mark.root,  # the chroot store builds in Nix's sandbox, and overlay mounts need root
    pytest.mark.skipif(NIX_DAEMON is None, reason="needs Nix (apt-get install nix-bin)"),
]

# Three derivations, one referring to the other two; every output carries the same file, which
# `nix-store --optimise` then hard-links; one compiles C with the host's gcc.
DERIVATIONS = """
let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" script ]; PATH = "/usr/bin:/bin";
  };
  data = mk "data-TAG" ''
    mkdir -p $out/share $out/bin
    echo shared by every path > $out/share/common
    printf '#!/bin/sh\\necho tool TAG\\n' > $out/bin/tool
    chmod 755 $out/bin/tool
    ln -s share/common $out/link
  '';
  hello = mk "hello-TAG" ''
    mkdir -p $out/bin $out/share
    echo shared by every path > $out/share/common
    printf '#include <stdio.h>\\nint main(void) { puts("hello TAG"); return 0; }\\n' > hello.c
    gcc -O2 -o $out/bin/hello hello.c
  '';
  app = mk "app-TAG" ''
    mkdir -p $out/share
    echo shared by every path > $out/share/common
    echo ${data} ${hello} > $out/share/deps
  '';
in [ data hello app ]
"""
SOCKET = "var/nix/daemon-socket/socket"


def expression(where: Path, tag: str) -> Path:
    """The derivations, tagged so that each test builds its own paths."""
    path = where / f"derivations-{tag}.nix"
    path.write_text(DERIVATIONS.replace("TAG", tag))
    return path


def listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``root`` but the daemon's socket: type, mode, owners, mtime, content."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                assert rel == SOCKET
                continue
            if stat.S_ISLNK(st.st_mode):
                content: str | None = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns, content)
    return out


def link_groups(root: Path) -> set[frozenset[str]]:
    """The sets of paths that are one inode."""
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(Path(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault(st.st_ino, set()).add(str(Path(dirpath, name).relative_to(root)))
    return {frozenset(g) for g in groups.values()}


def mount(env: Env, key: str, nix: NixRoot, strategy: str = "auto") -> None:
    env.run("disk", "mount", key, str(nix.nix), "--trust-owners", "--strategy", strategy)


def verified(nix: NixRoot, *paths: str) -> None:
    """The store's database and contents check out, and ``paths`` are valid in it."""
    proc = nix.run("nix-store", "--verify", "--check-contents", daemon=False)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr
    assert "modified" not in proc.stderr, proc.stderr
    assert nix.run("nix-store", "--check-validity", *paths, daemon=False).returncode == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_nix_store_and_its_database_survive_commit_and_mount_exactly(
        env: Env, tmp_path: Path, strategy: str) -> None:
    nix = NixRoot(tmp_path / "machine1")
    mount(env, "nix-store", nix, strategy)
    daemon = nix.start_daemon()
    try:
        paths = nix.build(expression(tmp_path, "round-trip"))
        assert len(paths) == 3
        nix.run("nix-store", "--optimise")
    finally:
        stop_daemon(daemon)  # what the pipeline's teardown step does
    before, groups = listing(nix.nix), link_groups(nix.nix)
    # The store as Nix leaves it: root-owned, read-only paths, files hard-linked by --optimise.
    store = [v for k, v in before.items() if k.startswith("store/") and "/" in k[6:]
             and not k.startswith("store/.links")]
    assert store and all(v[2] == 0 and (v[1] & 0o222 == 0 or v[0] == stat.S_IFLNK)
                         for v in store)
    assert any(len(g) >= 4 for g in groups)  # .links + the three copies of share/common
    assert "var/nix/db/db.sqlite" in before
    if "build-users-group = nixbld" in nix.env()["NIX_CONFIG"]:
        # The store is root:nixbld 1775 with build users: an owner only --trust-owners keeps.
        assert before["store"][1:4] == (0o1775, 0, grp.getgrnam("nixbld").gr_gid)
    assert (nix.nix / SOCKET).is_socket()

    committed = env.json("disk", "commit", str(nix.nix))
    assert committed["committed"] and committed["generation"] == 1

    # Another machine: an empty cache, so the mount restores the snapshot from the store.
    other = elsewhere(env, "machine2-cache")
    fresh = NixRoot(tmp_path / "machine2")
    mount(other, "nix-store", fresh, strategy)
    assert listing(fresh.nix) == before  # owners, modes, mtimes, content, links' targets
    assert link_groups(fresh.nix) == groups
    verified(fresh, *paths)
    daemon = fresh.start_daemon()
    try:
        # Valid without rebuilding: with no build slots, anything to build would fail.
        assert fresh.build(expression(tmp_path, "round-trip"), "--max-jobs", "0") == paths
        hello = next(p for p in paths if "-hello-" in p)
        assert (fresh.root / hello[1:] / "bin" / "hello").stat().st_mode & 0o111
    finally:
        stop_daemon(daemon)


def test_commit_names_the_nix_daemon_and_kill_holders_stops_it_cleanly(
        env: Env, tmp_path: Path) -> None:
    nix = NixRoot(tmp_path / "machine1")
    mount(env, "nix-busy", nix)
    daemon = nix.start_daemon()
    try:
        paths = nix.build(expression(tmp_path, "busy"))
        # The daemon holds nothing under the disk but its listening socket.
        busy = env.run("disk", "commit", str(nix.nix), check=False)
        assert busy.returncode == 6
        line = one_line_error(busy)
        assert f"pid {daemon.pid} (" in line and "nix-daemon" in line, line
        assert "--kill-holders" in line
        assert daemon.poll() is None and is_mount_record(env, nix.nix)

        done = env.json("disk", "commit", str(nix.nix), "--kill-holders")
        assert done["committed"]
        assert any(k.startswith(f"pid {daemon.pid} (") and "nix-daemon" in k
                   for k in done["killed"]), done["killed"]
        # Stopped by SIGTERM, in time: Nix's own handler ended it, not the SIGKILL fallback.
        assert daemon.wait(timeout=10) != -9
    finally:
        stop_daemon(daemon)
    other = elsewhere(env, "machine2-cache")
    fresh = NixRoot(tmp_path / "machine2")
    mount(other, "nix-busy", fresh)
    verified(fresh, *paths)


SLOW = """derivation { name = "slow"; system = builtins.currentSystem; builder = "/bin/sh";
                args = [ "-c" "sleep 617; echo done > $out" ]; PATH = "/usr/bin:/bin"; }"""


def builders() -> list[int]:
    """The slow derivation's ``sleep``, wherever it runs."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00617\x00":
                found.append(int(pid))
    return found


def test_kill_holders_mid_build_stops_the_sandboxed_builder_too(
        env: Env, tmp_path: Path) -> None:
    nix = NixRoot(tmp_path / "machine1")
    mount(env, "nix-mid-build", nix)
    daemon = nix.start_daemon()
    expr = tmp_path / "slow.nix"
    expr.write_text(SLOW)
    client = subprocess.Popen(["nix-build", "--store", f"unix://{nix.socket}", str(expr),
                               "--no-out-link"], env=nix.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bool(builders()), "the build to start")
        # The builder runs in Nix's sandbox: another mount namespace, rooted in a chroot on
        # the disk, where its paths read "/" and "/build".
        done = env.json("disk", "commit", str(nix.nix), "--kill-holders")
        assert done["committed"] and any("own mount namespace" in k for k in done["killed"])
        assert not builders()
        client.communicate(timeout=60)
    finally:
        for pid in builders():
            os.kill(pid, signal.SIGKILL)
        stop_daemon(daemon)
        if client.poll() is None:
            client.kill()
            client.communicate()
    fresh = NixRoot(tmp_path / "machine2")
    mount(elsewhere(env, "machine2-cache"), "nix-mid-build", fresh)
    # Whether the build was cut short or finished, the store is consistent.
    proc = fresh.run("nix-store", "--verify", "--check-contents", daemon=False)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr


# Inside a private mount namespace the disk goes at /nix itself, as on the seed's runners: a
# tmpfs first hides whatever this machine keeps there (nix-setup-systemd's skeleton).
AT_NIX = """
set -euo pipefail
mount -t tmpfs -o size=1m tmpfs /nix
"$PYTHON" -m stickyci disk mount nix-at-root /nix --trust-owners
if [ "$STEP" = build ]; then
    setsid nix-daemon </dev/null >"$LOGS/daemon.log" 2>&1 &
    trap "kill $! 2>/dev/null || true" EXIT  # if the script fails before --kill-holders
    for _ in $(seq 100); do nix store ping --store daemon >/dev/null 2>&1 && break; sleep 0.1; done
    nix-build --store daemon --no-out-link "$EXPR" > "$LOGS/paths"
    if "$PYTHON" -m stickyci disk commit /nix 2> "$LOGS/busy"; then exit 1; fi
    "$PYTHON" -m stickyci disk commit /nix --kill-holders --json > "$LOGS/commit.json"
else
    nix-store --verify --check-contents
    nix-store --check-validity $(cat "$LOGS/paths")
    "$PYTHON" -m stickyci disk unmount /nix
fi
"""


@pytest.mark.skipif(not Path("/nix").is_dir(), reason="no /nix to mount over in a namespace")
def test_the_disk_at_nix_itself_in_a_private_mount_namespace(env: Env, tmp_path: Path) -> None:
    nix = NixRoot(tmp_path / "unused")
    environ = {**env.environ, **nix.env(), "PYTHON": sys.executable, "LOGS": str(tmp_path),
               "EXPR": str(expression(tmp_path, "at-nix"))}
    del environ["NIX_DAEMON_SOCKET_PATH"]  # the default: /nix/var/nix/daemon-socket/socket
    # No chroot store: the host's nix.conf decides on the sandbox, as on the seed's runners.
    environ["NIX_CONFIG"] = "\n".join(line for line in environ["NIX_CONFIG"].splitlines()
                                      if not line.startswith("sandbox-paths"))

    def in_namespace(step: str, cache: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                               AT_NIX], env={**environ, "STEP": step,
                                             "STICKYCI_CACHE_DIR": str(tmp_path / cache)},
                              capture_output=True, text=True, timeout=300)

    built = in_namespace("build", "machine1-cache")
    assert built.returncode == 0, built.stderr
    busy = (tmp_path / "busy").read_text()
    assert "/nix is busy: pid" in busy and "(nix-daemon" in busy, busy
    committed = json.loads((tmp_path / "commit.json").read_text())
    assert committed["committed"] and any("nix-daemon" in k for k in committed["killed"])
    checked = in_namespace("check", "machine2-cache")
    assert checked.returncode == 0, checked.stderr
