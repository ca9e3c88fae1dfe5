"""The real Nix (Debian's nix-bin, 2.8) for tests: chroot stores, store paths, copy, substitute.

Each :class:`Nix` keeps its own narinfo cache (``XDG_CACHE_HOME``): a client remembers the
narinfos it uploaded, so a test that substitutes what it copied must do it as another client.
No builder needs nixpkgs: derivations run the host's ``/bin/sh``, seen through sandbox paths,
and bigger trees go in with ``nix-store --add``.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from server import Server

from stickyci.server.nix import nix32

NIX = shutil.which("nix")
needs_nix = pytest.mark.skipif(NIX is None, reason="needs Nix (apt-get install nix-bin)")

_CHAIN = """
let a = derivation {{ name = "a-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
                     args = ["-c" "echo {tag} > $out"]; }};
in derivation {{ name = "b-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
                args = ["-c" "echo ${{a}} > $out"]; }}
"""


@dataclass(frozen=True)
class Nix:
    """A Nix client with its own store (``ROOT/store``, a chroot store) and caches."""

    root: Path
    config: str = ""
    """More ``nix.conf`` lines (``name = value``, each ending with a newline)."""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def store(self) -> str:
        """The ``--store`` argument."""
        return str(self.root / "store")

    def env(self) -> dict[str, str]:
        """The client's environment: its own home and narinfo cache."""
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.root / "home"),
                "XDG_CACHE_HOME": str(self.root / "xdg"),
                # builds run as root: no nixbld group needed (nix-bin alone, no systemd setup)
                "NIX_CONFIG": "experimental-features = nix-command\nsubstituters =\n"
                              "build-users-group =\n" + self.config}

    def argv(self, *args: str) -> list[str]:
        """A Nix command (``args``) on this client's store."""
        return [args[0], "--store", self.store, *args[1:]]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Nix command against this client's store."""
        proc = subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True,
                              timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def netrc(self, host: str, token: str) -> str:
        """Write a netrc giving ``token`` as the password for ``host``; its path."""
        path = self.root / "netrc"
        path.write_text(f"machine {host} login nix password {token}\n")
        return str(path)

    def build_chain(self, tag: str) -> tuple[str, str]:
        """Build two derivations, ``b`` referring to ``a``; their store paths (a, b)."""
        expr = self.root / f"chain-{tag}.nix"
        expr.write_text(_CHAIN.format(tag=tag))
        out = self.run("nix-build", "--option", "sandbox-paths", "/bin /lib /lib64 /usr",
                       str(expr), "--no-out-link").stdout.split()
        b = out[-1]
        a = self.run("nix-store", "--query", "--references", b).stdout.split()[0]
        return a, b

    def add_tree(self, name: str, files: dict[str, bytes]) -> str:
        """Add a directory of ``files`` to the store; its path."""
        tree = self.root / "trees" / name
        if tree.exists():
            shutil.rmtree(tree)
        for rel, data in files.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(data)
        return self.run("nix-store", "--add", str(tree)).stdout.strip()

    def copy_to(self, url: str, *paths: str, netrc: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        """``nix copy --to URL PATHS`` (their closures)."""
        extra = ["--option", "netrc-file", netrc] if netrc else []
        return self.run("nix", "copy", "--to", url, *extra, *paths, check=False)

    def substitute(self, url: str, key: str, path: str, netrc: str | None = None
                   ) -> subprocess.CompletedProcess[str]:
        """Realise ``path`` only from the substituter ``url``, trusting only ``key``."""
        extra = ["--option", "netrc-file", netrc] if netrc else []
        return self.run("nix-store", "--realise", path, "--option", "substituters", url,
                        "--option", "trusted-public-keys", key, *extra, check=False)

    def read(self, path: str) -> bytes:
        """A store path's content, if it is a file, from the chroot store."""
        return Path(self.store + path).read_bytes()

    def has(self, path: str) -> bool:
        """Whether ``path`` is valid in this client's store."""
        return self.run("nix-store", "--check-validity", path, check=False).returncode == 0

    def dump(self, path: str) -> bytes:
        """``path`` serialised as a NAR."""
        proc = subprocess.run(["nix", "store", "dump-path", "--store", self.store, path],
                              env=self.env(), capture_output=True, timeout=300, check=True)
        return proc.stdout


def random_files(seed: int, count: int, size: int) -> dict[str, bytes]:
    """``count`` incompressible files of ``size`` bytes, the same for the same seed."""
    rng = random.Random(seed)
    return {f"lib/file{i:03d}.bin": rng.randbytes(size) for i in range(count)}


def public_key(state: Path, cache: str) -> str:
    """``stickyci nix key show``: the cache's public key."""
    return subprocess.run([sys.executable, "-m", "stickyci", "nix", "key", "show",
                           "--state-dir", str(state), cache],
                          capture_output=True, text=True, check=True).stdout.strip()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, scraped now."""
    text = httpx2.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def settled(state: Path) -> None:
    """Wait until the server whose state directory is ``state`` has taken every NAR it spooled
    into its store (it answers an upload once the NAR is spooled)."""
    spool = state / "nix-spool"
    wait_for(lambda: not any(spool.glob("*.nar")), "the server to store the NARs it spooled")


def tree_bytes(root: Path) -> int:
    """Bytes of every file under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


NIX_DAEMON = shutil.which("nix-daemon")
SANDBOX_PATHS = "/bin /lib /lib64 /usr"


@dataclass(frozen=True)
class NixRoot:
    """A Nix store laid out as a machine's ``/nix`` under ``root``: ``ROOT/nix/store``, the
    database in ``ROOT/nix/var/nix/db``. A ``/nix`` disk is mounted at ``ROOT/nix``; Nix reaches
    the store as a chroot store (``--store ROOT``: store paths are still ``/nix/store/…``) or
    through a ``nix-daemon`` serving it on ``ROOT/nix/var/nix/daemon-socket/socket``.

    A chroot store always builds in Nix's sandbox, which sees the host's ``/bin/sh`` and gcc
    through ``sandbox-paths``. The client's home and caches live beside the root, off the disk.
    """

    root: Path

    @property
    def nix(self) -> Path:
        """Where the ``/nix`` disk is mounted."""
        return self.root / "nix"

    @property
    def socket(self) -> Path:
        """The daemon's socket, inside the disk as it is under ``/nix``."""
        return self.nix / "var" / "nix" / "daemon-socket" / "socket"

    def env(self) -> dict[str, str]:
        """Environment for the daemon and its clients: build users if the machine has them."""
        users = "nixbld" if _has_group("nixbld") else ""
        home = self.root.with_name(self.root.name + "-home")
        return {"PATH": "/usr/bin:/bin", "HOME": str(home / "home"),
                "XDG_CACHE_HOME": str(home / "xdg"), "NIX_DAEMON_SOCKET_PATH": str(self.socket),
                "NIX_CONFIG": "experimental-features = nix-command\nsubstituters =\n"
                              f"build-users-group = {users}\nsandbox-paths = {SANDBOX_PATHS}\n"}

    def start_daemon(self) -> subprocess.Popen[bytes]:
        """``nix-daemon --store ROOT`` in a session of its own, once its socket answers."""
        assert NIX_DAEMON is not None
        log = open(self.root.with_name(self.root.name + "-daemon.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen([NIX_DAEMON, "--store", str(self.root)], env=self.env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nix-daemon exited {proc.returncode}")
            return self.socket.exists() and self.run("nix", "store", "ping",
                                                     check=False).returncode == 0

        wait_for(answers, f"nix-daemon on {self.socket}", interval=0.1)  # a process a try
        return proc

    def run(self, *args: str, daemon: bool = True, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A Nix command through the daemon (or on the chroot store directly)."""
        store = f"unix://{self.socket}" if daemon else str(self.root)
        proc = subprocess.run([args[0], "--store", store, *args[1:]], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def build(self, expr: Path, *args: str, daemon: bool = True) -> list[str]:
        """``nix-build EXPR --no-out-link``; the output paths."""
        out = self.run("nix-build", str(expr), "--no-out-link", *args, daemon=daemon)
        return out.stdout.split()


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM ``proc`` (a daemon started by the test) and wait; its exit status."""
    if proc.poll() is None:
        proc.terminate()
    return proc.wait(timeout=timeout)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def client(srv: Server, cache: str, token: str | None) -> httpx2.Client:
    """A client of one cache, sending ``token`` as Nix does (HTTP Basic from a netrc)."""
    headers = {}
    if token:
        headers["authorization"] = "Basic " + base64.b64encode(f"nix:{token}".encode()).decode()
    return httpx2.Client(base_url=f"{srv.url}/nix/{cache}", headers=headers, timeout=60)


def narinfo(path: str, nar: bytes, **override: str) -> str:
    """The narinfo ``nix copy`` would upload for ``path`` whose NAR is ``nar``."""
    fields = {"StorePath": path, "URL": f"nar/{nix32(hashlib.sha256(nar).digest())}.nar",
              "Compression": "none", "NarHash": f"sha256:{nix32(hashlib.sha256(nar).digest())}",
              "NarSize": str(len(nar)), "References": "", **override}
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def upload(c: httpx2.Client, path: str, nar: bytes, **override: str) -> httpx2.Response:
    """PUT a NAR then its narinfo, as ``nix copy`` does; the narinfo's response."""
    r = c.put(f"/nar/{nix32(hashlib.sha256(nar).digest())}.nar", content=nar)
    assert r.status_code == 200, r.text
    return c.put(f"/{Path(path).name[:32]}.narinfo", content=narinfo(path, nar, **override))


def fresh_path(nix: Nix, name: str, size: int = 1000) -> tuple[str, bytes]:
    """A new store path of random content, and its NAR."""
    path = nix.add_tree(name, {"data": os.urandom(size)})
    return path, nix.dump(path)
